"""OASIS's part of the backbone stage (Sec. 4.1, OASIS): the generator + U-Net discriminator
step. Implements `fiancee_jax.train.gan.GANTask` (`OASIS.gan_task`).

One pure per-device step (`OASISGAN.train_step`): D update (class-balanced N+1 CE on real /
fake + LabelMix), then G update (N+1 CE with real targets on D(G(z, label)), plus the optional
OASIS VGG loss `train.vgg_lambda * VGG(G(z, label), real)`), then the EMA of the generator
(params and BN / spectral-norm state, as OASIS averages the whole state_dict). The frozen VGG
trunk rides in `StepState.frozen` (empty when vgg_lambda = 0).

Randomness depends only on (config.seed, step, global example index): z for example i of
the global batch comes from fold_in(step_key, i), the LabelMix class bits from the step
key, so a run is reproducible across device counts and across resumes.

Loader batches: uint8 'image' (B, H, W, 3), label ids 'label' (B, H, W).
"""
from __future__ import annotations

import json
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from fiancee_jax.backbones.oasis import discriminator as discriminator_lib
from fiancee_jax.backbones.oasis import losses
from fiancee_jax.backbones.oasis import model as oasis
from fiancee_jax.data.loader import Loader
from fiancee_jax.metrics import vgg_loss as vgg_lib
from fiancee_jax.nn.layers import MUTABLE, torch_default_scale_sn_kernels
from fiancee_jax.train import logging as tlog
from fiancee_jax.train import parallel
from fiancee_jax.train.state import StepState, adam, ema_update

PyTree = Any
Array = jax.Array
BATCH_KEYS = ('image', 'label')


def sample_z(key: Array, example_ids: Array, z_dim: int) -> Array:
  """z (B, z_dim) with example i drawn from fold_in(key, example_ids[i])."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (z_dim,)))(example_ids)


def preprocess(batch: dict[str, Array]) -> tuple[Array, Array]:
  """uint8 image (B,H,W,3) -> float in [-1, 1]; label ids -> int32 (B,H,W)."""
  image = batch['image'].astype(jnp.float32) / 127.5 - 1.0
  return image, batch['label'].astype(jnp.int32)


def _batch_arrays(ex: dict[str, Any]) -> dict[str, Any]:
  return {k: ex[k] for k in BATCH_KEYS}


class OASISGAN:
  """OASIS G + D, their Adam optimisers and loss weights (static: built once per config)."""
  sample_tag = 'label_real_ema'
  console_metrics = None          # every metric

  def __init__(self, config: ml_collections.ConfigDict,
               axis_name: str | None = parallel.AXIS, vgg_mode: str = vgg_lib.DEFAULT_MODE):
    t = config.train
    self.config, self.axis_name = config, axis_name
    self.generator = oasis.from_config(config, axis_name=axis_name)   # sync BN over the axis
    self.generator_local = oasis.from_config(config, axis_name=None)
    self.discriminator = discriminator_lib.from_config(config)
    self.tx_g = adam(t.lr_g, t.beta1, t.beta2, t.weight_decay)
    self.tx_d = adam(t.lr_d, t.beta1, t.beta2, t.weight_decay)
    self.num_classes, self.z_dim = int(config.data.num_classes), int(config.model.z_dim)
    self.labelmix_lambda, self.ema_decay = float(t.labelmix_lambda), float(t.ema_decay)
    self.vgg_lambda = float(t.vgg_lambda)
    self.vgg_mode = vgg_mode      # input convention of the VGG trunk (metrics/vgg_loss.py)

  def compile_key(self) -> str:
    """The config values the compiled code depends on (not num_steps, log_every, ...)."""
    c, t = self.config, self.config.train
    return json.dumps({
        'backbone': 'oasis', 'model': c.model.to_dict(), 'disc': c.disc.to_dict(),
        'shape': (c.data.height, c.data.width, c.data.num_classes),
        'dtype': c.dtype, 'parallel': c.parallel,
        'train': {k: t[k] for k in ('lr_g', 'lr_d', 'beta1', 'beta2', 'weight_decay',
                                    'labelmix_lambda', 'ema_decay', 'vgg_lambda', 'remat')},
    }, sort_keys=True, default=str)

  # ---------------------------------------------------------------- state

  def init_variables(self, k_g: Array, k_d: Array) -> tuple[PyTree, PyTree]:
    d = self.config.data
    labels = jnp.zeros((1, d.height, d.width), jnp.int32)
    z = jnp.zeros((1, self.z_dim), jnp.float32)
    image = jnp.zeros((1, d.height, d.width, 3), jnp.float32)
    return (self.generator_local.init({'params': k_g}, labels, z),
            self.discriminator.init({'params': k_d}, image))

  def init_params(self, params_g: PyTree, state_g: PyTree, params_d: PyTree, state_d: PyTree
                  ) -> tuple[PyTree, PyTree]:
    """train.sn_kernel_init='torch_default': spectral-norm kernels at PyTorch's default
    size (nn/layers.py; read at call time)."""
    if self.config.train.sn_kernel_init == 'torch_default':
      return (torch_default_scale_sn_kernels(params_g, state_g),
              torch_default_scale_sn_kernels(params_d, state_d))
    return params_g, params_d

  def frozen(self) -> dict[str, PyTree]:
    """The VGG19 trunk when train.vgg_lambda > 0."""
    return {'vgg': vgg_lib.load_params()[0]} if self.vgg_lambda > 0 else {}

  # ---------------------------------------------------------------- step

  def step_noise(self, rng: Array, step: Array, labels: Array,
                 axis_name: str | None = parallel.AXIS) -> tuple[Array, Array, Array]:
    """A step's random draws for this device's examples: z of D's fakes, z of G's fakes
    (B, z_dim) and the LabelMix mask (B, H, W, 1). They depend only on (rng, step, global
    example index); tests feed the same draws to the PyTorch reference."""
    b = labels.shape[0]
    first = lax.axis_index(axis_name) * b if axis_name is not None else 0
    ids = first + jnp.arange(b)
    k_zd, k_zg, k_lm = jax.random.split(jax.random.fold_in(rng, step), 3)
    return (sample_z(k_zd, ids, self.z_dim), sample_z(k_zg, ids, self.z_dim),
            losses.labelmix_mask(k_lm, labels, self.num_classes))

  def train_step(self, carry: StepState, batch: dict[str, Array], *,
                 axis_name: str | None = parallel.AXIS
                 ) -> tuple[StepState, dict[str, Array]]:
    """One OASIS iteration on this device's share of the batch: D update, G update, EMA."""
    state = carry.train
    G, D, N = self.generator, self.discriminator, self.num_classes
    real, labels = preprocess(batch)
    z_d, z_g, mask = self.step_noise(state.rng, state.step, labels, axis_name)
    weights = losses.class_balancing_weights(labels, N, axis_name=axis_name)
    mut_g, mut_d = list(state.state_g), list(state.state_d)
    pmean = (lambda x: lax.pmean(x, axis_name)) if axis_name is not None else (lambda x: x)

    def gen(params, collections, z):
      (img, _), new = G.apply({'params': params, **collections}, labels, z, train=True,
                              mutable=mut_g)
      return img, {**collections, **new}

    def disc(params, collections, image):
      (logits, _), new = D.apply({'params': params, **collections}, image, train=True,
                                 mutable=mut_d)
      return logits, {**collections, **new}

    # --- discriminator -------------------------------------------------------------------
    fake, state_g = gen(state.params_g, state.state_g, z_d)
    fake = lax.stop_gradient(fake)
    mixed = losses.labelmix_images(mask, real, fake)

    def d_loss_fn(params_d):
      sd = state.state_d
      d_fake, sd = disc(params_d, sd, fake)
      d_real, sd = disc(params_d, sd, real)
      l_fake = losses.n1_cross_entropy(d_fake, labels, for_real=False)
      l_real = losses.n1_cross_entropy(d_real, labels, for_real=True, weights=weights)
      total = l_fake + l_real
      l_lm = jnp.zeros(())
      if self.labelmix_lambda > 0:
        d_mixed, sd = disc(params_d, sd, mixed)
        l_lm = losses.labelmix_loss(mask, d_mixed, d_fake, d_real)
        total = total + self.labelmix_lambda * l_lm
      return total, (sd, {'d_fake': l_fake, 'd_real': l_real, 'd_labelmix': l_lm,
                          'd_total': total})

    (_, (state_d, d_metrics)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
        state.params_d)
    d_updates, opt_d = self.tx_d.update(pmean(d_grads), state.opt_d, state.params_d)
    params_d = optax.apply_updates(state.params_d, d_updates)

    # --- generator -----------------------------------------------------------------------
    def g_loss_fn(params_g):
      fake_g, sg = gen(params_g, state_g, z_g)
      logits, sd = disc(params_d, state_d, fake_g)
      adv = losses.n1_cross_entropy(logits, labels, for_real=True, weights=weights)
      total, metrics = adv, {'g_adv': adv}
      if self.vgg_lambda > 0:
        vgg = vgg_lib.apply(carry.frozen['vgg'], fake_g, real, self.vgg_mode)
        vgg = vgg * vgg_lib.loss_scale(self.vgg_mode)
        total = total + self.vgg_lambda * vgg
        metrics['g_vgg'] = vgg
      return total, (sg, sd, metrics)

    (_, (state_g, state_d, g_metrics)), g_grads = jax.value_and_grad(
        g_loss_fn, has_aux=True)(state.params_g)
    g_updates, opt_g = self.tx_g.update(pmean(g_grads), state.opt_g, state.params_g)
    params_g = optax.apply_updates(state.params_g, g_updates)

    # --- EMA (OASIS update_EMA after every iteration) ------------------------------------
    new_state = state.replace(
        step=state.step + 1, params_g=params_g, params_d=params_d, state_g=state_g,
        state_d=state_d, ema_params_g=ema_update(state.ema_params_g, params_g, self.ema_decay),
        ema_state_g=ema_update(state.ema_state_g, state_g, self.ema_decay),
        opt_g=opt_g, opt_d=opt_d)
    return carry.replace(train=new_state), pmean({**d_metrics, **g_metrics})

  # ---------------------------------------------------------------- data

  def loader(self, src: Any, batch_size: int, *, seed: int, shuffle: bool = True,
             state: dict | None = None, process_index: int = 0,
             process_count: int = 1) -> Loader:
    """Batches of (image, label) examples of `src`."""
    return Loader(src, batch_size, seed=seed, shuffle=shuffle, process_index=process_index,
                  process_count=process_count, state=state, transform=_batch_arrays)

  def refresh_batches(self, batches: Iterator[dict], num: int) -> Iterator[dict]:
    """`num` (label, z) batches, z of batch i from fold_in(PRNGKey(config.seed + 3), i)."""
    key = jax.random.PRNGKey(self.config.seed + 3)
    for i in range(num):
      labels = np.asarray(next(batches)['label'], np.int32)
      z = jax.random.normal(jax.random.fold_in(key, i), (labels.shape[0], self.z_dim))
      yield {'label': labels, 'z': z}

  def refresh_apply(self, variables: PyTree, batch: dict) -> tuple[Any, PyTree]:
    return self.generator_local.apply(variables, batch['label'], batch['z'], train=True,
                                      mutable=list(MUTABLE))

  # ---------------------------------------------------------------- samples

  def sample_inputs(self, src: Any) -> dict[str, np.ndarray]:
    """The first min(4, train.batch_size) examples of the split (in order) and fixed noises
    from PRNGKey(config.seed + 2): int32 'label' (N, H, W), 'real' (N, H, W, 3) in [-1, 1],
    'z' (N, z_dim)."""
    c = self.config
    batch = next(self.loader(src, min(4, c.train.batch_size, len(src)), seed=c.seed,
                             shuffle=False))
    labels = np.asarray(batch['label'], np.int32)
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(c.seed + 2),
                                     (labels.shape[0], self.z_dim)))
    return {'label': labels, 'real': np.asarray(batch['image'], np.float32) / 127.5 - 1.0,
            'z': z}

  def sample(self, params: PyTree, collections: dict[str, PyTree],
             inputs: dict[str, np.ndarray]) -> Array:
    img, _ = self.generator_local.apply({'params': params, **collections}, inputs['label'],
                                        inputs['z'], train=False)
    return img

  def sample_grid(self, inputs: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """label | real | EMA generator."""
    return tlog.sample_grid(inputs['label'], inputs['real'], images)

"""Backbone stage: train the OASIS generator + U-Net discriminator (Sec. 4.1, OASIS).

One pure per-device step (`train_step`): D update (class-balanced N+1 CE on real / fake +
LabelMix), then G update (N+1 CE with real targets on D(G(z, label)), plus the optional OASIS
VGG loss `train.vgg_lambda * VGG(G(z, label), real)`), then the EMA of the generator (params
and BN / spectral-norm state, as OASIS averages the whole state_dict). The step's state is a
`StepState`: the checkpointed `GANState` plus the frozen VGG trunk (jit arguments, never
constants; empty when vgg_lambda = 0).
Gradients and metrics are averaged over `axis_name`; the models' sync batch norm averages
statistics over it, so N devices on a global batch equal one device on that batch.

Randomness depends only on (config.seed, step, global example index): z for example i of
the global batch comes from fold_in(step_key, i), the LabelMix class bits from the step
key, so a run is reproducible across device counts and across resumes.

`train_and_evaluate(config, workdir)` runs the stage: data, resume, loop, progress,
TensorBoard, samples, checkpoints, clean stop on SIGTERM / Ctrl-C.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from fiancee_jax import config as cfg
from fiancee_jax.backbones.oasis import losses
from fiancee_jax.metrics import vgg_loss as vgg_lib
from fiancee_jax.backbones.oasis import discriminator as discriminators
from fiancee_jax.backbones.oasis import model as oasis
from fiancee_jax.nn.layers import MUTABLE, torch_default_scale_sn_kernels
from fiancee_jax.train import bn_refresh, checkpoint, loop, parallel
from fiancee_jax.train import logging as tlog
from fiancee_jax.train.state import GANState, StepState, adam, ema_update, split_variables

STAGE = 'backbone'
PyTree = Any


@dataclasses.dataclass(frozen=True)
class Models:
  """The static half of the step: modules, optimisers and loss weights (hashable)."""
  generator: nn.Module          # with axis_name: sync BN over devices (train step)
  generator_local: nn.Module    # axis_name None: sampling / BN refresh on one device
  discriminator: nn.Module
  tx_g: optax.GradientTransformation
  tx_d: optax.GradientTransformation
  num_classes: int
  z_dim: int
  labelmix_lambda: float
  ema_decay: float
  vgg_lambda: float = 0.0
  vgg_mode: str = 'caffe'       # input convention of the VGG trunk (metrics/vgg_loss.py)

  def __hash__(self):  # optax transformations are not hashable; identity is enough
    return id(self)


def build_models(config: ml_collections.ConfigDict, axis_name: str | None = parallel.AXIS
                 ) -> Models:
  """Modules + optimisers of an OASIS config (one clear error for what is not supported)."""
  if config.backbone != 'oasis':
    raise ValueError(f'train.py --stage=backbone: config.backbone={config.backbone!r}; '
                     "only 'oasis' backbone training is implemented here")
  t = config.train
  return Models(
      generator=oasis.from_config(config, axis_name=axis_name),
      generator_local=oasis.from_config(config, axis_name=None),
      discriminator=discriminators.from_config(config),
      tx_g=adam(t.lr_g, t.beta1, t.beta2, t.weight_decay),
      tx_d=adam(t.lr_d, t.beta1, t.beta2, t.weight_decay),
      num_classes=config.data.num_classes, z_dim=config.model.z_dim,
      labelmix_lambda=float(t.labelmix_lambda), ema_decay=float(t.ema_decay),
      vgg_lambda=float(t.vgg_lambda), vgg_mode=vgg_lib.DEFAULT_MODE)


def step_state(models: Models, train: GANState) -> StepState:
  """Wrap a train state with the frozen arrays the step needs (the VGG trunk if used)."""
  frozen = {'vgg': vgg_lib.load_params()[0]} if models.vgg_lambda > 0 else {}
  return StepState(train=train, frozen=frozen)


def create_train_state(config: ml_collections.ConfigDict, models: Models | None = None,
                       rng: jax.Array | None = None) -> GANState:
  """Initial state (host arrays): G, D, EMA = copy of G, Adam states, base rng."""
  models = models or build_models(config)
  rng = jax.random.PRNGKey(config.seed) if rng is None else rng
  k_g, k_d, k_train = jax.random.split(rng, 3)
  d = config.data
  labels = jnp.zeros((1, d.height, d.width), jnp.int32)
  z = jnp.zeros((1, models.z_dim), jnp.float32)
  image = jnp.zeros((1, d.height, d.width, 3), jnp.float32)
  init_g, init_d = _init_fns(models)
  params_g, state_g = split_variables(init_g(k_g, labels, z))
  params_d, state_d = split_variables(init_d(k_d, image))
  if config.train.sn_kernel_init == 'torch_default':
    params_g = torch_default_scale_sn_kernels(params_g, state_g)
    params_d = torch_default_scale_sn_kernels(params_d, state_d)
  state = GANState(
      step=jnp.zeros((), jnp.int32), params_g=params_g, params_d=params_d,
      state_g=state_g, state_d=state_d,
      ema_params_g=params_g, ema_state_g=state_g,
      opt_g=models.tx_g.init(params_g), opt_d=models.tx_d.init(params_d), rng=k_train)
  return jax.device_get(state)


@functools.lru_cache(maxsize=8)
def _init_fns(models: Models):
  """Jitted initialisers, cached per Models (compiling the init is slow on CPU)."""
  init_g = jax.jit(lambda k, labels, z: models.generator_local.init({'params': k}, labels, z))
  init_d = jax.jit(lambda k, image: models.discriminator.init({'params': k}, image))
  return init_g, init_d


def sample_z(key: jax.Array, example_ids: jax.Array, z_dim: int) -> jax.Array:
  """z (B, z_dim) with example i drawn from fold_in(key, example_ids[i])."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (z_dim,)))(example_ids)


def step_noise(rng: jax.Array, step: jax.Array, labels: jax.Array, models: Models,
               axis_name: str | None = parallel.AXIS) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A step's random draws for this device's examples: z of D's fakes, z of G's fakes
  (B, z_dim) and the LabelMix mask (B, H, W, 1). They depend only on (rng, step, global
  example index); tests feed the same draws to the PyTorch reference."""
  b = labels.shape[0]
  first = lax.axis_index(axis_name) * b if axis_name is not None else 0
  ids = first + jnp.arange(b)
  k_zd, k_zg, k_lm = jax.random.split(jax.random.fold_in(rng, step), 3)
  return (sample_z(k_zd, ids, models.z_dim), sample_z(k_zg, ids, models.z_dim),
          losses.labelmix_mask(k_lm, labels, models.num_classes))


def preprocess(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """uint8 image (B,H,W,3) -> float in [-1, 1]; label ids -> int32 (B,H,W)."""
  image = batch['image'].astype(jnp.float32) / 127.5 - 1.0
  return image, batch['label'].astype(jnp.int32)


def train_step(carry: StepState, batch: dict[str, jax.Array], *, models: Models,
               axis_name: str | None = parallel.AXIS) -> tuple[StepState, dict[str, jax.Array]]:
  """One OASIS iteration on this device's share of the batch: D update, G update, EMA."""
  state = carry.train
  G, D, N = models.generator, models.discriminator, models.num_classes
  real, labels = preprocess(batch)
  z_d, z_g, mask = step_noise(state.rng, state.step, labels, models, axis_name)
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

  # --- discriminator ---------------------------------------------------------------------
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
    if models.labelmix_lambda > 0:
      d_mixed, sd = disc(params_d, sd, mixed)
      l_lm = losses.labelmix_loss(mask, d_mixed, d_fake, d_real)
      total = total + models.labelmix_lambda * l_lm
    return total, (sd, {'d_fake': l_fake, 'd_real': l_real, 'd_labelmix': l_lm, 'd_total': total})

  (_, (state_d, d_metrics)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state.params_d)
  d_grads = pmean(d_grads)
  d_updates, opt_d = models.tx_d.update(d_grads, state.opt_d, state.params_d)
  params_d = optax.apply_updates(state.params_d, d_updates)

  # --- generator ---------------------------------------------------------------------------
  def g_loss_fn(params_g):
    fake_g, sg = gen(params_g, state_g, z_g)
    logits, sd = disc(params_d, state_d, fake_g)
    adv = losses.n1_cross_entropy(logits, labels, for_real=True, weights=weights)
    total, metrics = adv, {'g_adv': adv}
    if models.vgg_lambda > 0:
      vgg = vgg_lib.apply(carry.frozen['vgg'], fake_g, real, models.vgg_mode)
      vgg = vgg * vgg_lib.loss_scale(models.vgg_mode)
      total = total + models.vgg_lambda * vgg
      metrics['g_vgg'] = vgg
    return total, (sg, sd, metrics)

  (_, (state_g, state_d, g_metrics)), g_grads = jax.value_and_grad(
      g_loss_fn, has_aux=True)(state.params_g)
  g_grads = pmean(g_grads)
  g_updates, opt_g = models.tx_g.update(g_grads, state.opt_g, state.params_g)
  params_g = optax.apply_updates(state.params_g, g_updates)

  # --- EMA (OASIS update_EMA after every iteration) ----------------------------------------
  ema_params_g = ema_update(state.ema_params_g, params_g, models.ema_decay)
  ema_state_g = ema_update(state.ema_state_g, state_g, models.ema_decay)

  new_state = state.replace(
      step=state.step + 1, params_g=params_g, params_d=params_d, state_g=state_g,
      state_d=state_d, ema_params_g=ema_params_g, ema_state_g=ema_state_g,
      opt_g=opt_g, opt_d=opt_d)
  metrics = pmean({**d_metrics, **g_metrics})
  return carry.replace(train=new_state), metrics


def make_step(models: Models) -> Callable[..., tuple[StepState, dict]]:
  """The per-device step with the static models bound (pass to parallel.wrap)."""
  return functools.partial(train_step, models=models)


def _compile_key(config: ml_collections.ConfigDict) -> str:
  """The config values the compiled step depends on (not num_steps, log_every, ...)."""
  t = config.train
  return json.dumps({
      'model': config.model.to_dict(), 'disc': config.disc.to_dict(),
      'shape': (config.data.height, config.data.width, config.data.num_classes),
      'dtype': config.dtype, 'parallel': config.parallel,
      'train': {k: t[k] for k in ('lr_g', 'lr_d', 'beta1', 'beta2', 'weight_decay',
                                  'labelmix_lambda', 'ema_decay', 'vgg_lambda')},
  }, sort_keys=True, default=str)


_COMPILED: dict[str, tuple[Models, parallel.DataParallel]] = {}


def compiled(config: ml_collections.ConfigDict) -> tuple[Models, parallel.DataParallel]:
  """(Models, wrapped step) for a config, reused by runs of the same architecture and
  optimiser settings in one process (a resumed run in tests does not recompile)."""
  key = _compile_key(config)
  if key not in _COMPILED:
    if len(_COMPILED) >= 4:
      _COMPILED.pop(next(iter(_COMPILED)))
    models = build_models(config)
    _COMPILED[key] = (models, parallel.wrap(make_step(models), config.parallel))
  return _COMPILED[key]


# ----------------------------------------------------------------------------------------
# Sampling and BN refresh of the EMA generator (single device, no axis).


@functools.lru_cache(maxsize=8)
def _refresh_apply(models: Models):
  def apply(variables, batch):
    return models.generator_local.apply(variables, batch['label'], batch['z'], train=True,
                                        mutable=list(MUTABLE))
  return apply


@functools.lru_cache(maxsize=8)
def _sampler(models: Models):
  def sample(params, collections, labels, z):
    img, _ = models.generator_local.apply({'params': params, **collections}, labels, z,
                                          train=False)
    return img
  return jax.jit(sample)


def refresh_ema_stats(models: Models, state: GANState, batches: Iterator[dict], num: int,
                      seed: int) -> dict[str, PyTree]:
  """EMA generator collections after `num` train-mode batches (OASIS: 50)."""
  key = jax.random.PRNGKey(seed)
  apply = _refresh_apply(models)

  def gen():
    for i in range(num):
      batch = next(batches)
      labels = np.asarray(batch['label'], np.int32)
      z = jax.random.normal(jax.random.fold_in(key, i), (labels.shape[0], models.z_dim))
      yield {'label': labels, 'z': z}
  return bn_refresh.refresh_bn_stats(apply, state.ema_params_g, dict(state.ema_state_g), gen())


# ----------------------------------------------------------------------------------------
# The stage.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       hooks: Sequence[loop.Hook] = ()) -> GANState:
  """Train (or resume) the OASIS backbone in `workdir`; returns the final host state.

  Writes `workdir/checkpoints/backbone/<step>` (state + EMA generator with refreshed BN
  stats + data position), `workdir/tensorboard`, `workdir/samples/step_<n>.png`.
  `hooks(step, device_state, metrics)` run after each step (tests use them)."""
  if config.backbone == 'megaportraits':  # the head-avatar backbone has its own stage module
    from fiancee_jax.train import heads  # noqa: PLC0415
    return heads.train_and_evaluate(config, workdir, hooks=hooks)
  cfg.validate(config)
  return checkpoint.with_stage(workdir, STAGE, config, config.train.keep_ckpts,
                               lambda ckpt: _train(config, workdir, ckpt, hooks))


def _train(config: ml_collections.ConfigDict, workdir: str, ckpt: checkpoint.Checkpointer,
           hooks: Sequence[loop.Hook]) -> GANState:
  from fiancee_jax import data as fdata  # noqa: PLC0415 (heavy: tfds)
  from fiancee_jax.data.loader import Loader  # noqa: PLC0415

  t = config.train
  models, dp = compiled(config)
  parallel.check_batch_size(t.batch_size, dp.num_devices)
  pcount, pindex = jax.process_count(), jax.process_index()
  is_chief = pindex == 0

  data_dir = cfg.data_dir(config, workdir)
  parallel.chief_first(lambda: fdata.prepare(config.data, data_dir), 'prepare')
  train_src = fdata.source(config.data, 'train', data_dir)

  host_state, loader_state = ckpt.resume_gan(create_train_state(config, models), STAGE)

  train_loader = Loader(train_src, t.batch_size, seed=config.seed, shuffle=True,
                        process_index=pindex, process_count=pcount, state=loader_state)
  refresh_bs = max(1, min(t.batch_size, 8, len(train_src)))

  def refresh_iter():  # the same batches whatever the process count
    return Loader(train_src, refresh_bs, seed=config.seed + 1, shuffle=True)

  sample_batch = next(Loader(train_src, min(4, t.batch_size, len(train_src)), seed=config.seed,
                             shuffle=False))
  sample_z_ = np.asarray(jax.random.normal(jax.random.PRNGKey(config.seed + 2),
                                           (sample_batch['label'].shape[0], models.z_dim)))

  writer = tlog.MetricWriter(os.path.join(workdir, 'tensorboard'), enabled=is_chief)
  start = int(host_state.step)

  def step_fn(state):
    batch = next(train_loader)
    return dp(state, dp.put_batch({'image': batch['image'], 'label': batch['label']}))

  def snapshot(step, state, write_samples, write_ckpt):
    host = dp.get_state(state.train)
    # Process 0 refreshes: its samples, and the checkpoint's host arrays are its own (orbax
    # writes host arrays from process 0 only); the others pass a placeholder of that shape.
    refreshed = (refresh_ema_stats(models, host, refresh_iter(), t.bn_refresh_batches,
                                   config.seed + 3) if is_chief else host.ema_state_g)
    if write_samples and is_chief:
      img = _sampler(models)(host.ema_params_g, refreshed,
                             np.asarray(sample_batch['label'], np.int32), sample_z_)
      real = np.asarray(sample_batch['image'], np.float32) / 127.5 - 1.0
      grid = tlog.sample_grid(np.asarray(sample_batch['label']), real, np.asarray(img))
      writer.image(step, 'samples/label_real_ema', grid)
      tlog.write_png(os.path.join(workdir, 'samples', f'step_{step:07d}.png'), grid)
    if write_ckpt:
      # Host arrays (process 0 writes them; orbax refuses a one-device jax.Array when
      # there are several processes).
      ckpt.save(step, {'train': host, 'ema_bn': jax.device_get(refreshed)},
                {'data': train_loader.state(), 'num_steps': int(t.num_steps)})

  try:
    state, _ = loop.run(
        dp.put_state(step_state(models, host_state)), start, loop.Cadence.of(t), name=STAGE,
        step_fn=step_fn, snapshot=snapshot, writer=writer,
        saved_step=start if ckpt.latest_step() == start else None, hooks=hooks,
        hint='lower train.lr_g / train.lr_d or check the data')
    return dp.get_state(state.train)
  finally:
    writer.close()

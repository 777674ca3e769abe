"""MegaPortraits's part of the backbone stage (Sec. 4.2, S1.2.2): the HeadAvatar + multi-scale
patch discriminator step. Implements `fiancee_jax.train.gan.GANTask` (`MegaPortraits.gan_task`).

Data are self-reenactment pairs of the train split (source and driver: two frames of one
identity / video); the target is the driver frame. One pure per-device step (`train_step`):

  * G update: Eq. S3 without gaze (`losses.g_loss`): hinge against the multi-scale patch
    discriminator + c1 VGG19 + c2 MS-SSIM + c3 L1 + c4 feature matching, all on the
    foreground mask (weights `train.loss_weights`, S1.2.2), + the L1 of the motion
    encoder's head angles vs the driver's where the data have them (synthetic_heads);
  * D update: hinge on the masked driver frame (real) and the masked generated frame (fake)
    -- the same generated frame as the G update (pix2pixHD computes both losses from one
    generator forward), with the discriminator as it was before this step;
  * EMA of the generator (params and BN statistics, decay `train.ema_decay`).
AdamW(beta1 0.05, beta2 0.999, weight decay 1e-2) for G and D, lr cosine-decayed from
`train.lr_g` / `train.lr_d` to `train.min_lr` over `train.num_steps` (S1.2.2).
`config.dtype = 'bfloat16'` computes G and D in bfloat16 with float32 params, losses and
optimiser (the models take the compute dtype from the config). Sync batch norm and the L1
normaliser use the global batch.

Loader batches: uint8 'source_image', 'driver_image' (B, H, W, 3), 'driver_mask' (B, H, W)
and optionally 'driver_pose' (B, 3) degrees (see `losses.pair_batch`).
"""
from __future__ import annotations

import functools
import json
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from fiancee_jax import data as fdata
from fiancee_jax.backbones.megaportraits import discriminator as discriminator_lib
from fiancee_jax.backbones.megaportraits import losses
from fiancee_jax.backbones.megaportraits import model as megaportraits
from fiancee_jax.data import heads as heads_data
from fiancee_jax.metrics import vgg_loss
from fiancee_jax.train import logging as tlog
from fiancee_jax.train import parallel
from fiancee_jax.train.state import StepState, adam, ema_update

PyTree = Any
Array = jax.Array
TRAIN_KEYS = ('source_image', 'driver_image', 'driver_mask', 'driver_pose')
CONSOLE_METRICS = ('g_total', 'g_adv', 'g_vgg', 'g_l1', 'g_angles', 'd_loss')   # the rest: TB


def lr_schedule(lr: float, config: ml_collections.ConfigDict) -> optax.Schedule:
  """Cosine from `lr` to `train.min_lr` over `train.num_steps` (S1.2.2)."""
  t = config.train
  return optax.cosine_decay_schedule(lr, max(int(t.num_steps), 1), alpha=t.min_lr / lr)


def train_example(ex: dict[str, Any]) -> dict[str, np.ndarray]:
  """A reenactment pair -> the arrays the step reads. Frames without a segmentation
  (video_frames) count as foreground everywhere."""
  out = {k: ex[k] for k in TRAIN_KEYS if k in ex}
  if 'driver_mask' not in out:
    out['driver_mask'] = np.full(np.shape(ex['driver_image'])[:2], 255, np.uint8)
  return out


def to_pm1(x: np.ndarray) -> np.ndarray:
  return np.asarray(x, np.float32) / 127.5 - 1.0


class HeadsGAN:
  """HeadAvatar G + patch D, AdamW with cosine lr, Eq. S3 weights (static per config)."""
  sample_tag = 'source_driver_ema_target'
  console_metrics = CONSOLE_METRICS

  def __init__(self, config: ml_collections.ConfigDict, axis_name: str | None = parallel.AXIS):
    t = config.train
    weights = dict(t.loss_weights)
    losses.check_weights(weights, vgg_params={})   # VGG19: loaded by `frozen`
    self.config, self.axis_name = config, axis_name
    self.generator = megaportraits.from_config(config, axis_name=axis_name)
    self.generator_local = megaportraits.from_config(config, axis_name=None)
    self.discriminator = discriminator_lib.from_config(config)
    self.lr_g = lr_schedule(t.lr_g, config)
    self.tx_g = adam(self.lr_g, t.beta1, t.beta2, t.weight_decay)
    self.tx_d = adam(lr_schedule(t.lr_d, config), t.beta1, t.beta2, t.weight_decay)
    self.loss_weights = tuple(sorted(weights.items()))   # c1..c5 of Eq. S3
    self.ema_decay = float(t.ema_decay)

  def compile_key(self) -> str:
    """The config values the compiled code depends on (num_steps: the lr schedule)."""
    c, t = self.config, self.config.train
    return json.dumps({
        'backbone': 'megaportraits', 'model': c.model.to_dict(), 'disc': c.disc.to_dict(),
        'shape': (c.data.height, c.data.width), 'dtype': c.dtype,
        'parallel': c.parallel, 'loss_weights': t.loss_weights.to_dict(),
        'train': {k: t[k] for k in ('lr_g', 'lr_d', 'beta1', 'beta2', 'weight_decay', 'min_lr',
                                    'num_steps', 'ema_decay', 'remat')},
    }, sort_keys=True, default=str)

  # ---------------------------------------------------------------- state

  def init_variables(self, k_g: Array, k_d: Array) -> tuple[PyTree, PyTree]:
    d = self.config.data
    img = jnp.zeros((1, d.height, d.width, 3), jnp.float32)
    return (self.generator_local.init({'params': k_g}, img, img, False),
            self.discriminator.init({'params': k_d}, img))

  def init_params(self, params_g: PyTree, state_g: PyTree, params_d: PyTree, state_d: PyTree
                  ) -> tuple[PyTree, PyTree]:
    return params_g, params_d

  def frozen(self) -> dict[str, PyTree]:
    """The VGG19 trunk when loss_weights.vgg > 0 (host arrays: put_state copies them)."""
    if dict(self.loss_weights).get('vgg', 0.0) > 0:
      return {'vgg': jax.device_get(vgg_loss.load_params()[0])}
    return {}

  # ---------------------------------------------------------------- step

  def train_step(self, carry: StepState, batch: dict[str, Array], *,
                 axis_name: str | None = parallel.AXIS
                 ) -> tuple[StepState, dict[str, Array]]:
    """One iteration on this device's share of the batch: G update, D update, EMA."""
    state = carry.train
    pmean = (lambda x: lax.pmean(x, axis_name)) if axis_name is not None else (lambda x: x)
    pairs = losses.pair_batch(batch)

    # --- generator -----------------------------------------------------------------------
    g_fn = functools.partial(losses.g_loss, model=self.generator, disc=self.discriminator,
                             weights=dict(self.loss_weights), vgg_params=carry.frozen.get('vgg'),
                             axis_name=axis_name)
    (_, (g_metrics, state_g, fake)), g_grads = jax.value_and_grad(g_fn, has_aux=True)(
        state.params_g, state.state_g, state.params_d, pairs)
    g_updates, opt_g = self.tx_g.update(pmean(g_grads), state.opt_g, state.params_g)
    params_g = optax.apply_updates(state.params_g, g_updates)

    # --- discriminator (same generated frame, detached inside d_loss) ----------------------
    (_, d_metrics), d_grads = jax.value_and_grad(
        functools.partial(losses.d_loss, disc=self.discriminator), has_aux=True)(
            state.params_d, pairs, fake)
    d_updates, opt_d = self.tx_d.update(pmean(d_grads), state.opt_d, state.params_d)
    params_d = optax.apply_updates(state.params_d, d_updates)

    # --- EMA of the generator (params and BN running statistics) ---------------------------
    new_state = state.replace(
        step=state.step + 1, params_g=params_g, params_d=params_d, state_g=state_g,
        ema_params_g=ema_update(state.ema_params_g, params_g, self.ema_decay),
        ema_state_g=ema_update(state.ema_state_g, state_g, self.ema_decay),
        opt_g=opt_g, opt_d=opt_d)
    metrics = {f'g_{k}': v for k, v in g_metrics.items()}
    metrics.update(d_metrics, lr=jnp.asarray(self.lr_g(state.step), jnp.float32))
    return carry.replace(train=new_state), pmean(metrics)

  # ---------------------------------------------------------------- data

  def loader(self, src: Any, batch_size: int, *, seed: int, shuffle: bool = True,
             state: dict | None = None, process_index: int = 0,
             process_count: int = 1) -> fdata.Loader:
    """Resumable batches of the self-reenactment pairs of `src` (`train_example`)."""
    return fdata.Loader(fdata.reenactment_pairs(src, self.config.seed), batch_size, seed=seed,
                        shuffle=shuffle, process_index=process_index,
                        process_count=process_count, state=state, transform=train_example)

  def refresh_batches(self, batches: Iterator[dict], num: int) -> Iterator[dict]:
    for _ in range(num):
      b = next(batches)
      yield {'source': to_pm1(b['source_image']), 'driver': to_pm1(b['driver_image'])}

  def refresh_apply(self, variables: PyTree, batch: dict) -> tuple[Any, PyTree]:
    return self.generator_local.apply(variables, batch['source'], batch['driver'], True,
                                      mutable=['batch_stats'])

  # ---------------------------------------------------------------- samples

  def sample_inputs(self, src: Any, num: int = 4) -> dict[str, np.ndarray]:
    """Fixed sample rows: `num` self-reenactment pairs spread over the split (target =
    driver) and, on synthetic_heads with >= 2 identities, `num` cross-reenactment triplets
    (driver of another identity; target = the source identity rendered in the driver's pose
    and expression). 'source', 'driver', 'target' (N, H, W, 3) in [-1, 1]."""
    pairs = fdata.reenactment_pairs(src, self.config.seed)
    rows = [pairs[int(i)] for i in np.unique(np.linspace(0, len(pairs) - 1, num).round())]
    rows = [dict(r, target_image=r['driver_image']) for r in rows]
    if (getattr(src, 'name', '') == 'synthetic_heads' and
        len(heads_data.split_identities(src.config.num_identities)[src.split]) >= 2):
      cross = fdata.cross_reenactment(src, self.config.seed + 5, num)
      rows += [cross[k] for k in range(num)]
    return {k: to_pm1(np.stack([r[f'{k}_image'] for r in rows]))
            for k in ('source', 'driver', 'target')}

  def sample(self, params: PyTree, collections: dict[str, PyTree],
             inputs: dict[str, np.ndarray]) -> Array:
    return self.generator_local.apply({'params': params, **collections}, inputs['source'],
                                      inputs['driver'], False)[0]

  def sample_grid(self, inputs: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """source | driver | EMA generator | target."""
    return tlog.image_grid(inputs['source'], inputs['driver'], images, inputs['target'])

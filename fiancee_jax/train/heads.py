"""Head-avatar backbone stage: train the MegaPortraits-style HeadAvatar + patch D (Sec. 4.2).

`train.py --stage=backbone` with `config.backbone == 'megaportraits'` lands here. Data are
self-reenactment pairs of the train split (source and driver: two frames of one identity /
video); the target is the driver frame. One pure per-device step (`train_step`):

  * G update: Eq. S3 without gaze (`losses_heads.g_loss`): hinge against the multi-scale
    patch discriminator + c1 VGG19 + c2 MS-SSIM + c3 L1 + c4 feature matching, all on the
    foreground mask (weights `train.loss_weights`, S1.2.2), + the L1 of the motion
    encoder's head angles vs the driver's where the data have them (synthetic_heads);
  * D update: hinge on the masked driver frame (real) and the masked generated frame (fake)
    -- the same generated frame as the G update (pix2pixHD computes both losses from one
    generator forward), with the discriminator as it was before this step;
  * EMA of the generator (params and BN statistics, decay `train.ema_decay`).
AdamW(beta1 0.05, beta2 0.999, weight decay 1e-2) for G and D, lr cosine-decayed from
`train.lr_g` / `train.lr_d` to `train.min_lr` over `train.num_steps` (S1.2.2).
`config.dtype = 'bfloat16'` computes G and D in bfloat16 with float32 params, losses and
optimiser (the models take the compute dtype from the config).

Gradients and metrics are averaged over `axis_name`; sync batch norm and the L1 normaliser
use the global batch, so N devices on a global batch equal one device on it.

Checkpoints share the OASIS backbone's layout (`checkpoints/backbone`, {'train': GANState,
'ema_bn': EMA generator BN stats refreshed on train batches}), so later stages load the EMA
generator with `checkpoint.load_backbone`.
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
from fiancee_jax.backbones.megaportraits import losses as losses_heads
from fiancee_jax.backbones.megaportraits import discriminator as patch_discriminator
from fiancee_jax.backbones.megaportraits import model as megaportraits
from fiancee_jax.train import bn_refresh, checkpoint, loop, parallel
from fiancee_jax.train import logging as tlog
from fiancee_jax.train.state import GANState, StepState, adam, ema_update, split_variables

STAGE = 'backbone'
PyTree = Any
TRAIN_KEYS = ('source_image', 'driver_image', 'driver_mask', 'driver_pose')
CONSOLE_METRICS = ('g_total', 'g_adv', 'g_vgg', 'g_l1', 'g_angles', 'd_loss')   # the rest: TB


@dataclasses.dataclass(frozen=True)
class Models:
  """The static half of the step: modules, optimisers, schedules, loss weights."""
  generator: nn.Module          # sync BN over the data axis (train step)
  generator_local: nn.Module    # no axis: init, sampling, BN refresh
  discriminator: nn.Module
  tx_g: optax.GradientTransformation
  tx_d: optax.GradientTransformation
  lr_g: optax.Schedule
  loss_weights: tuple[tuple[str, float], ...]   # c1..c5 of Eq. S3 (items of a dict)
  ema_decay: float

  def __hash__(self):  # optax transformations are not hashable; identity is enough
    return id(self)


def lr_schedule(lr: float, config: ml_collections.ConfigDict) -> optax.Schedule:
  """Cosine from `lr` to `train.min_lr` over `train.num_steps` (S1.2.2)."""
  t = config.train
  return optax.cosine_decay_schedule(lr, max(int(t.num_steps), 1), alpha=t.min_lr / lr)


def build_models(config: ml_collections.ConfigDict, axis_name: str | None = parallel.AXIS
                 ) -> Models:
  """Modules + AdamW optimisers of a head-avatar config."""
  if config.backbone != 'megaportraits':
    raise ValueError(f"heads.build_models: config.backbone={config.backbone!r}; expected "
                     "'megaportraits'")
  t = config.train
  weights = dict(t.loss_weights)
  losses_heads.check_weights(weights, vgg_params={})   # VGG19: loaded by frozen_arrays
  lr_g, lr_d = lr_schedule(t.lr_g, config), lr_schedule(t.lr_d, config)
  return Models(
      generator=megaportraits.from_config(config, axis_name=axis_name),
      generator_local=megaportraits.from_config(config, axis_name=None),
      discriminator=patch_discriminator.from_config(config),
      tx_g=adam(lr_g, t.beta1, t.beta2, t.weight_decay),
      tx_d=adam(lr_d, t.beta1, t.beta2, t.weight_decay),
      lr_g=lr_g, loss_weights=tuple(sorted(weights.items())), ema_decay=float(t.ema_decay))


def frozen_arrays(models: Models) -> dict[str, PyTree]:
  """The read-only arrays the step needs: the VGG19 trunk when loss_weights.vgg > 0."""
  if dict(models.loss_weights).get('vgg', 0.0) > 0:
    from fiancee_jax.metrics import vgg_loss  # noqa: PLC0415 (reads the weight package)
    return {'vgg': jax.device_get(vgg_loss.load_params()[0])}   # host: put_state copies
  return {}


@functools.lru_cache(maxsize=8)
def _init_fns(models: Models):
  """Jitted initialisers, cached per Models (compiling the init is slow on CPU)."""
  init_g = jax.jit(lambda k, img: models.generator_local.init({'params': k}, img, img, False))
  init_d = jax.jit(lambda k, img: models.discriminator.init({'params': k}, img))
  return init_g, init_d


def create_train_state(config: ml_collections.ConfigDict, models: Models | None = None,
                       rng: jax.Array | None = None) -> GANState:
  """Initial state (host arrays): G, D, EMA = copy of G, AdamW states, base rng."""
  models = models or build_models(config)
  rng = jax.random.PRNGKey(config.seed) if rng is None else rng
  k_g, k_d, k_train = jax.random.split(rng, 3)
  image = jnp.zeros((1, config.data.height, config.data.width, 3), jnp.float32)
  init_g, init_d = _init_fns(models)
  params_g, state_g = split_variables(init_g(k_g, image))
  params_d, state_d = split_variables(init_d(k_d, image))
  state = GANState(
      step=jnp.zeros((), jnp.int32), params_g=params_g, params_d=params_d,
      state_g=state_g, state_d=state_d, ema_params_g=params_g, ema_state_g=state_g,
      opt_g=models.tx_g.init(params_g), opt_d=models.tx_d.init(params_d), rng=k_train)
  return jax.device_get(state)


def train_step(carry: StepState, batch: dict[str, jax.Array], *, models: Models,
               axis_name: str | None = parallel.AXIS) -> tuple[StepState, dict[str, jax.Array]]:
  """One iteration on this device's share of the batch: G update, D update, EMA.

  batch: uint8 'source_image', 'driver_image' (B, H, W, 3), 'driver_mask' (B, H, W) and
  optionally 'driver_pose' (B, 3) degrees (see `losses_heads.pair_batch`)."""
  state = carry.train
  pmean = (lambda x: lax.pmean(x, axis_name)) if axis_name is not None else (lambda x: x)
  pairs = losses_heads.pair_batch(batch)

  # --- generator -------------------------------------------------------------------------
  g_fn = functools.partial(losses_heads.g_loss, model=models.generator,
                           disc=models.discriminator, weights=dict(models.loss_weights),
                           vgg_params=carry.frozen.get('vgg'), axis_name=axis_name)
  (_, (g_metrics, state_g, fake)), g_grads = jax.value_and_grad(g_fn, has_aux=True)(
      state.params_g, state.state_g, state.params_d, pairs)
  g_updates, opt_g = models.tx_g.update(pmean(g_grads), state.opt_g, state.params_g)
  params_g = optax.apply_updates(state.params_g, g_updates)

  # --- discriminator (same generated frame, detached inside d_loss) ------------------------
  (_, d_metrics), d_grads = jax.value_and_grad(
      functools.partial(losses_heads.d_loss, disc=models.discriminator), has_aux=True)(
          state.params_d, pairs, fake)
  d_updates, opt_d = models.tx_d.update(pmean(d_grads), state.opt_d, state.params_d)
  params_d = optax.apply_updates(state.params_d, d_updates)

  # --- EMA of the generator (params and BN running statistics) -----------------------------
  new_state = state.replace(
      step=state.step + 1, params_g=params_g, params_d=params_d, state_g=state_g,
      ema_params_g=ema_update(state.ema_params_g, params_g, models.ema_decay),
      ema_state_g=ema_update(state.ema_state_g, state_g, models.ema_decay),
      opt_g=opt_g, opt_d=opt_d)
  metrics = {f'g_{k}': v for k, v in g_metrics.items()}
  metrics.update(d_metrics, lr=jnp.asarray(models.lr_g(state.step), jnp.float32))
  return carry.replace(train=new_state), pmean(metrics)


def make_step(models: Models) -> Callable[..., tuple[StepState, dict]]:
  """The per-device step with the static models bound (pass to parallel.wrap)."""
  return functools.partial(train_step, models=models)


def _compile_key(config: ml_collections.ConfigDict) -> str:
  """The config values the compiled step depends on (num_steps: the lr schedule)."""
  t = config.train
  return json.dumps({
      'model': config.model.to_dict(), 'disc': config.disc.to_dict(),
      'shape': (config.data.height, config.data.width), 'dtype': config.dtype,
      'parallel': config.parallel, 'loss_weights': t.loss_weights.to_dict(),
      'train': {k: t[k] for k in ('lr_g', 'lr_d', 'beta1', 'beta2', 'weight_decay', 'min_lr',
                                  'num_steps', 'ema_decay')},
  }, sort_keys=True, default=str)


_COMPILED: dict[str, tuple[Models, parallel.DataParallel]] = {}


def compiled(config: ml_collections.ConfigDict) -> tuple[Models, parallel.DataParallel]:
  """(Models, wrapped step) for a config, reused by runs of the same architecture and
  optimiser settings in one process (a resumed run does not recompile)."""
  key = _compile_key(config)
  if key not in _COMPILED:
    if len(_COMPILED) >= 4:
      _COMPILED.pop(next(iter(_COMPILED)))
    models = build_models(config)
    _COMPILED[key] = (models, parallel.wrap(make_step(models), config.parallel))
  return _COMPILED[key]


# ----------------------------------------------------------------------------------------
# Data, BN refresh and samples of the EMA generator (host side, one device).


def train_example(ex: dict[str, Any]) -> dict[str, np.ndarray]:
  """A reenactment pair -> the arrays the step reads. Frames without a segmentation
  (video_frames) count as foreground everywhere."""
  out = {k: ex[k] for k in TRAIN_KEYS if k in ex}
  if 'driver_mask' not in out:
    out['driver_mask'] = np.full(np.shape(ex['driver_image'])[:2], 255, np.uint8)
  return out


def pairs_loader(config: ml_collections.ConfigDict, src: Any, batch_size: int, seed: int,
                 state: dict | None = None, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Shuffled, resumable batches of self-reenactment pairs of `src`."""
  from fiancee_jax import data as fdata  # noqa: PLC0415 (heavy: tfds)
  return fdata.Loader(fdata.reenactment_pairs(src, config.seed), batch_size, seed=seed,
                      shuffle=True, process_index=process_index, process_count=process_count,
                      state=state, transform=train_example)


def sample_inputs(config: ml_collections.ConfigDict, src: Any, num: int = 4
                  ) -> dict[str, np.ndarray]:
  """Fixed sample rows: `num` self-reenactment pairs spread over the split (target = driver)
  and, on synthetic_heads with >= 2 identities, `num` cross-reenactment triplets (driver of
  another identity; target = the source identity rendered in the driver's pose and
  expression). uint8 'source', 'driver', 'target' (N, H, W, 3)."""
  from fiancee_jax import data as fdata  # noqa: PLC0415
  from fiancee_jax.data import heads as heads_data  # noqa: PLC0415
  pairs = fdata.reenactment_pairs(src, config.seed)
  rows = [pairs[int(i)] for i in np.unique(np.linspace(0, len(pairs) - 1, num).round())]
  rows = [dict(r, target_image=r['driver_image']) for r in rows]
  if (getattr(src, 'name', '') == 'synthetic_heads' and
      len(heads_data.split_identities(src.config.num_identities)[src.split]) >= 2):
    cross = fdata.cross_reenactment(src, config.seed + 5, num)
    rows += [cross[k] for k in range(num)]
  return {k: np.stack([r[f'{k}_image'] for r in rows]) for k in ('source', 'driver', 'target')}


def _to_pm1(x: np.ndarray) -> np.ndarray:
  return np.asarray(x, np.float32) / 127.5 - 1.0


@functools.lru_cache(maxsize=8)
def _refresh_apply(models: Models):
  def apply(variables, batch):
    return models.generator_local.apply(variables, batch['source'], batch['driver'], True,
                                        mutable=['batch_stats'])
  return apply


@functools.lru_cache(maxsize=8)
def _sampler(models: Models):
  def sample(params, collections, source, driver):
    return models.generator_local.apply({'params': params, **collections}, source, driver,
                                        False)[0]
  return jax.jit(sample)


def refresh_ema_stats(models: Models, state: GANState, batches: Iterator[dict],
                      num: int) -> dict[str, PyTree]:
  """EMA generator collections after `num` train-mode batches (see train/bn_refresh.py)."""
  def gen():
    for _ in range(num):
      b = next(batches)
      yield {'source': _to_pm1(b['source_image']), 'driver': _to_pm1(b['driver_image'])}
  return bn_refresh.refresh_bn_stats(_refresh_apply(models), state.ema_params_g,
                                     dict(state.ema_state_g), gen())


def sample_grid(models: Models, params: PyTree, collections: dict[str, PyTree],
                inputs: dict[str, np.ndarray]) -> np.ndarray:
  """uint8 grid, one row per sample: source | driver | generated | target."""
  source, driver = _to_pm1(inputs['source']), _to_pm1(inputs['driver'])
  fake = np.asarray(_sampler(models)(params, collections, source, driver))
  return tlog.image_grid(source, driver, fake, _to_pm1(inputs['target']))


# ----------------------------------------------------------------------------------------
# The stage.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       hooks: Sequence[loop.Hook] = ()) -> GANState:
  """Train (or resume) the head-avatar backbone in `workdir`; returns the final host state.

  Writes `workdir/checkpoints/backbone/<step>` (train state + refreshed EMA BN stats + data
  position), `workdir/tensorboard`, `workdir/samples/step_<n>.png` (source | driver | EMA
  generator | target). `hooks(step, device_state, metrics)` run after each step."""
  cfg.validate(config)
  return checkpoint.with_stage(workdir, STAGE, config, config.train.keep_ckpts,
                               lambda ckpt: _train(config, workdir, ckpt, hooks))


def _train(config: ml_collections.ConfigDict, workdir: str, ckpt: checkpoint.Checkpointer,
           hooks: Sequence[loop.Hook]) -> GANState:
  from fiancee_jax import data as fdata  # noqa: PLC0415 (heavy: tfds)

  t = config.train
  models, dp = compiled(config)
  parallel.check_batch_size(t.batch_size, dp.num_devices)
  pcount, pindex = jax.process_count(), jax.process_index()
  is_chief = pindex == 0

  data_dir = cfg.data_dir(config, workdir)
  parallel.chief_first(lambda: fdata.prepare(config.data, data_dir), 'prepare')
  train_src = fdata.source(config.data, 'train', data_dir)

  host_state, loader_state = ckpt.resume_gan(create_train_state(config, models), STAGE)
  train_loader = pairs_loader(config, train_src, t.batch_size, config.seed, loader_state,
                              pindex, pcount)
  refresh_bs = max(1, min(t.batch_size, 8, len(train_src)))
  inputs = sample_inputs(config, train_src)
  writer = tlog.MetricWriter(os.path.join(workdir, 'tensorboard'), enabled=is_chief)
  start = int(host_state.step)

  def step_fn(state):
    return dp(state, dp.put_batch(next(train_loader)))

  def snapshot(step, state, write_samples, write_ckpt):
    host = dp.get_state(state.train)
    # Process 0 refreshes: its samples, and the checkpoint's host arrays are its own (orbax
    # writes host arrays from process 0 only); the others pass a placeholder of that shape.
    refreshed = refresh_ema_stats(
        models, host, pairs_loader(config, train_src, refresh_bs, config.seed + 1),
        t.bn_refresh_batches) if is_chief else host.ema_state_g
    if write_samples and is_chief:
      grid = sample_grid(models, host.ema_params_g, refreshed, inputs)
      writer.image(step, 'samples/source_driver_ema_target', grid)
      tlog.write_png(os.path.join(workdir, 'samples', f'step_{step:07d}.png'), grid)
    if write_ckpt:
      # Host arrays (process 0 writes them; orbax refuses a one-device jax.Array when
      # there are several processes).
      ckpt.save(step, {'train': host, 'ema_bn': jax.device_get(refreshed)},
                {'data': train_loader.state(), 'num_steps': int(t.num_steps)})

  try:
    state = dp.put_state(StepState(train=host_state, frozen=frozen_arrays(models)))
    state, _ = loop.run(
        state, start, loop.Cadence.of(t), name=STAGE, step_fn=step_fn, snapshot=snapshot,
        writer=writer, saved_step=start if ckpt.latest_step() == start else None, hooks=hooks,
        console=lambda m: {k: v for k, v in m.items() if k in CONSOLE_METRICS},
        hint='lower train.lr_g / train.lr_d or check the data')
    return dp.get_state(state.train)
  finally:
    writer.close()


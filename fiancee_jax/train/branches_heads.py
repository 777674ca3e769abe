"""Branches stage for head avatars: the G2D exit branches against the frozen backbone (S1.2.2).

`train.py --stage=branches` with a megaportraits config lands here (train/branches.py
dispatches). Data: self-reenactment pairs of the train split, read as the backbone stage
reads them, + the source's identity (it picks the frame bank). One pure per-device step
(`train_step`) for all exits at once:
  * the frozen backbone (EMA weights, refreshed BN stats, eval mode) runs the encoders, G2D's
    input conv and ResBlock2D 1..9 once: the output of every exit's block, the driver's
    motion key and the target = the backbone's image (`fiancee_heads.backbone_forward`);
  * with the bank, the frame of the source identity whose key is nearest to the driver's
    motion key is retrieved once and shared by all exits (`branches.use_bank=False`: the
    ablation without it, checkpoints under `branches_nobank`);
  * branch update: sum over exits of Eq. S3 without gaze (`losses_heads.image_losses`: hinge
    against that exit's own copy of the multi-scale patch discriminator + c1 VGG19 + c2
    MS-SSIM + c3 L1 + c4 feature matching, weights `train.loss_weights`) against the
    backbone's image, on the driver's foreground mask. The exit images are stacked on a
    leading axis and applied exit by exit with their discriminator copies (`state.per_copy`);
  * discriminator update: each copy (initialised from the backbone's trained discriminator)
    gets the hinge loss on the masked backbone image (real) vs its exit's masked image
    (fake, detached: the branch images of the branch update).
AdamW(train.beta1 = 0.05, train.beta2 = 0.999, weight decay train.weight_decay = 1e-2) for
branches and discriminators, lr cosine from branches.lr to train.min_lr over
branches.num_steps (S1.2.2).

The train state, checkpoint payload and stage name are train/branches.py's (`BranchTrain`,
`BranchState`, `checkpoints/branches[_nobank]`, so `fiancee.load_branches` reads both
backbones' branches); the loop is train/loop.py.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from fiancee_jax import config as cfg
from fiancee_jax import fiancee, fiancee_heads
from fiancee_jax.backbones.megaportraits import losses as losses_heads
from fiancee_jax.backbones.megaportraits import discriminator as patch_discriminator
from fiancee_jax.train import branches as tb
from fiancee_jax.train import checkpoint, heads, loop, parallel
from fiancee_jax.train import logging as tlog
from fiancee_jax.train.state import adam, per_copy, split_variables

PyTree = Any
CONSOLE_METRICS = ('b_total',)   # + every exit's total; the rest goes to TensorBoard


@flax.struct.dataclass
class Frozen:
  """Read-only inputs of the step (jit arguments, passed through unchanged)."""
  generator: PyTree         # backbone variables (EMA params + refreshed BN stats)
  bank: Any                 # stacked frame banks of the train identities, or None
  bank_slots: Any           # (max id + 1,) int32: identity -> bank class, or None
  vgg: PyTree               # VGG19 trunk when loss_weights.vgg > 0, else None


@dataclasses.dataclass(frozen=True)
class Models:
  """Static half of the step (hashable by identity)."""
  generator: nn.Module          # frozen HeadAvatar, eval mode, no axis
  branches: nn.Module           # G2DBranches with axis_name: sync BN over devices
  discriminator: nn.Module
  tx_b: optax.GradientTransformation
  tx_d: optax.GradientTransformation
  lr: optax.Schedule
  exits: tuple[int, ...]
  use_bank: bool
  loss_weights: tuple[tuple[str, float], ...]
  backend: str
  config: ml_collections.ConfigDict   # what the modules were built from (init, samples)

  def __hash__(self):
    return id(self)


def lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Cosine from branches.lr to train.min_lr over branches.num_steps (S1.2.2)."""
  b, t = config.branches, config.train
  return optax.cosine_decay_schedule(b.lr, max(int(b.num_steps), 1), alpha=t.min_lr / b.lr)


def build_models(config: ml_collections.ConfigDict, axis_name: str | None = parallel.AXIS
                 ) -> Models:
  """Modules, AdamW optimisers and loss weights of the head-avatar branches stage."""
  if config.backbone != 'megaportraits':
    raise ValueError(f"branches_heads: config.backbone={config.backbone!r}; expected "
                     "'megaportraits'")
  b, t = config.branches, config.train
  weights = dict(t.loss_weights)
  losses_heads.check_weights(weights, vgg_params={})   # VGG19: loaded by load_frozen
  use_bank = bool(b.use_bank)
  lr = lr_schedule(config)
  return Models(
      generator=fiancee_heads.build_modules(config)[0],
      branches=fiancee_heads.build_modules(config, use_bank, axis_name)[1],
      discriminator=patch_discriminator.from_config(config),
      tx_b=adam(lr, t.beta1, t.beta2, t.weight_decay),
      tx_d=adam(lr, t.beta1, t.beta2, t.weight_decay), lr=lr,
      exits=tuple(sorted(b.exits)), use_bank=use_bank,
      loss_weights=tuple(sorted(weights.items())), backend=config.bank.backend,
      config=ml_collections.ConfigDict(config.to_dict()))


@functools.lru_cache(maxsize=8)
def _init_fn(models: Models) -> Callable:
  """Jitted branch initialiser, cached per Models (compiling it is slow on CPU)."""
  config = models.config
  local = fiancee_heads.build_modules(config, use_bank=models.use_bank)[1]
  return jax.jit(functools.partial(fiancee_heads.init_branches, config, local))


def create_train_state(config, models: Models, disc: tuple[PyTree, PyTree],
                       rng: jax.Array | None = None) -> tb.BranchTrain:
  """Fresh branches + one copy of the backbone's discriminator per exit (host arrays)."""
  rng = jax.random.PRNGKey(config.seed + 7) if rng is None else rng
  k_b, k_train = jax.random.split(rng)
  params_b, state_b = split_variables(_init_fn(models)(k_b))
  e = len(models.exits)
  stack = lambda t: jax.tree.map(lambda x: np.stack([np.asarray(x)] * e), t)  # noqa: E731
  params_d, state_d = stack(disc[0]), stack(dict(disc[1]))
  return jax.device_get(tb.BranchTrain(
      step=jnp.zeros((), jnp.int32), params_b=params_b, state_b=state_b, params_d=params_d,
      state_d=state_d, opt_b=models.tx_b.init(params_b), opt_d=models.tx_d.init(params_d),
      rng=k_train))


def train_step(state: tb.BranchState, batch: dict[str, jax.Array], *, models: Models,
               axis_name: str | None = parallel.AXIS) -> tuple[tb.BranchState, dict]:
  """One iteration on this device's share of the batch: branch update, then D update.

  batch: uint8 'source_image', 'driver_image' (B, H, W, 3), 'driver_mask' (B, H, W) and
  int 'source_identity' (B,) (see `train_example`)."""
  tr, fr = state.train, state.frozen
  D = models.discriminator
  weights = dict(models.loss_weights)
  pairs = losses_heads.pair_batch(batch)
  mask = pairs['mask']
  feats, motion, target = jax.tree.map(lax.stop_gradient, fiancee_heads.backbone_forward(
      models.generator, fr.generator, pairs['source'], pairs['driver'], models.exits))
  frame = (fiancee_heads.retrieve_frame(fr.bank, fr.bank_slots, motion,
                                        batch['source_identity'], models.backend)
           if models.use_bank else None)
  pmean = (lambda x: lax.pmean(x, axis_name)) if axis_name is not None else (lambda x: x)

  # --- branches: Eq. S3 per exit against the backbone image, exit by exit -------------------
  def exit_loss(params_d, fake):
    logits, aux = D.apply({'params': params_d}, losses_heads.apply_mask(fake, mask))
    real_feats = None
    if weights.get('fm', 0.0) > 0:
      real_feats = D.apply({'params': params_d},
                           losses_heads.apply_mask(target, mask))[1]['feats']
    return losses_heads.image_losses(fake, target, mask, (logits, aux['feats']), real_feats,
                                     weights, vgg_params=fr.vgg, axis_name=axis_name)

  def b_loss_fn(params_b):
    imgs, new_sb = models.branches.apply({'params': params_b, **tr.state_b}, feats, frame, True,
                                         mutable=list(tr.state_b))
    fakes = jnp.stack([imgs[k] for k in models.exits])
    totals, parts = per_copy(exit_loss, tr.params_d, fakes)
    return jnp.sum(totals), ({**tr.state_b, **new_sb}, fakes, parts)

  (b_total, (state_b, fakes, b_parts)), b_grads = jax.value_and_grad(
      b_loss_fn, has_aux=True)(tr.params_b)
  b_updates, opt_b = models.tx_b.update(pmean(b_grads), tr.opt_b, tr.params_b)
  params_b = optax.apply_updates(tr.params_b, b_updates)

  # --- discriminators: hinge, backbone image (real) vs each exit's image (fake) -------------
  fakes = lax.stop_gradient(fakes)
  real = {'driver': target, 'mask': mask}   # d_loss: real = batch['target'] or the driver

  def d_loss_fn(params_d):
    tot, parts = per_copy(lambda p, f: losses_heads.d_loss(p, real, f, disc=D), params_d,
                          fakes)
    return jnp.sum(tot), parts

  (_, d_parts), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(tr.params_d)
  d_updates, opt_d = models.tx_d.update(pmean(d_grads), tr.opt_d, tr.params_d)
  params_d = optax.apply_updates(tr.params_d, d_updates)

  metrics = {'b_total': b_total, 'lr': jnp.asarray(models.lr(tr.step), jnp.float32)}
  for i, k in enumerate(models.exits):
    metrics.update({f'exit{k}/{n}': v[i] for n, v in {**b_parts, **d_parts}.items()})
  new_train = tr.replace(step=tr.step + 1, params_b=params_b, state_b=state_b,
                         params_d=params_d, opt_b=opt_b, opt_d=opt_d)
  return state.replace(train=new_train), pmean(metrics)


def make_step(models: Models) -> Callable[..., tuple[tb.BranchState, dict]]:
  return functools.partial(train_step, models=models)


def _compile_key(config: ml_collections.ConfigDict) -> str:
  """The config values the compiled step depends on."""
  t = config.train
  return json.dumps({
      'model': config.model.to_dict(), 'disc': config.disc.to_dict(),
      'branches': config.branches.to_dict(), 'shape': (config.data.height, config.data.width),
      'dtype': config.dtype, 'parallel': config.parallel, 'backend': config.bank.backend,
      'loss_weights': t.loss_weights.to_dict(),
      'train': {k: t[k] for k in ('beta1', 'beta2', 'weight_decay', 'min_lr')},
  }, sort_keys=True, default=str)


_COMPILED: dict[str, tuple[Models, parallel.DataParallel]] = {}


def compiled(config: ml_collections.ConfigDict) -> tuple[Models, parallel.DataParallel]:
  """(Models, wrapped step) for a config, reused within a process (a resumed run in the
  same process does not retrace)."""
  key = _compile_key(config)
  if key not in _COMPILED:
    if len(_COMPILED) >= 4:
      _COMPILED.pop(next(iter(_COMPILED)))
    models = build_models(config)
    _COMPILED[key] = (models, parallel.wrap(make_step(models), config.parallel))
  return _COMPILED[key]


# ------------------------------------------------------------------------------ inputs

def load_frozen(config, workdir: str, models: Models) -> tuple[Frozen, dict]:
  """(Frozen inputs, backbone meta): EMA backbone, the train identities' frame banks (when
  guided) and the VGG19 trunk (when loss_weights.vgg > 0)."""
  g_params, g_coll, g_meta = fiancee._load_backbone(config, workdir)  # noqa: SLF001
  bank = slots = None
  if models.use_bank:
    data_dir = cfg.data_dir(config, workdir)
    ids = fiancee_heads.split_identities(config, data_dir, 'train')
    fb = fiancee_heads.load_banks(config, workdir, ids, g_meta.get('step'))
    bank, slots = fb.bank, jnp.asarray(fb.slots)
  vgg = None
  if dict(models.loss_weights).get('vgg', 0.0) > 0:
    from fiancee_jax.metrics import vgg_loss  # noqa: PLC0415 (reads the weight package)
    vgg = vgg_loss.load_params()[0]
  return Frozen(generator={'params': g_params, **g_coll}, bank=bank, bank_slots=slots,
                vgg=vgg), g_meta


def train_example(ex: dict[str, Any]) -> dict[str, np.ndarray]:
  """A reenactment pair -> the arrays the step reads (the backbone stage's + the source's
  identity)."""
  return dict(heads.train_example(ex), source_identity=np.int32(ex['source_identity']))


def sample_inputs(config, src: Any, num: int = 4) -> dict[str, np.ndarray]:
  """Fixed sample rows: `num` self-reenactment pairs spread over the split and, with >= 2
  identities in it, `num` pairs whose driver is another identity (as at inference).
  uint8 'source', 'driver' (N, H, W, 3), 'identity' (N,) of the source."""
  from fiancee_jax import data as fdata  # noqa: PLC0415
  pairs = fdata.reenactment_pairs(src, config.seed)
  rows = [pairs[int(i)] for i in np.unique(np.linspace(0, len(pairs) - 1, num).round())]
  ids = np.array([int(src[i]['identity']) for i in range(len(src))])
  if len(np.unique(ids)) >= 2:
    rng = np.random.default_rng([config.seed, 23])
    for r in list(rows):
      other = np.flatnonzero(ids != int(r['source_identity']))
      d = src[int(other[rng.integers(len(other))])]
      rows.append(dict(r, driver_image=d['image']))
  return {'source': np.stack([r['source_image'] for r in rows]),
          'driver': np.stack([r['driver_image'] for r in rows]),
          'identity': np.array([int(r['source_identity']) for r in rows], np.int32)}


# ------------------------------------------------------------------------------ samples

@functools.lru_cache(maxsize=8)
def _images_fn(models: Models) -> Callable:
  """Jitted (params, source, driver, identity) -> stacked [frame,] backbone, exit images;
  cached per Models (every snapshot reuses the compiled function)."""
  gen, br = fiancee_heads.build_modules(models.config, use_bank=models.use_bank)
  pipeline = fiancee.Pipeline(models.config, gen, br, None, None, {}, np.zeros(0), models.exits)

  def fn(params, source, driver, identity):
    out = fiancee_heads.all_images(pipeline, params, source, driver, identity, models.backend)
    cols = ([out['frame']] if 'frame' in out else []) + [out['backbone']]
    return jnp.stack(cols + [out[k] for k in pipeline.exits])
  return jax.jit(fn)


def sample_grid(models: Models, frozen: Frozen, host: tb.BranchTrain,
                inputs: dict[str, np.ndarray]) -> np.ndarray:
  """uint8 grid, one row per sample: source | driver | [bank frame] | backbone | exits."""
  params = {'generator': frozen.generator, 'branches': {'params': host.params_b, **host.state_b},
            'predictor': None, 'bank': frozen.bank, 'bank_slots': frozen.bank_slots}
  source = inputs['source'].astype(np.float32) / 127.5 - 1.0
  driver = inputs['driver'].astype(np.float32) / 127.5 - 1.0
  imgs = np.asarray(_images_fn(models)(params, source, driver, inputs['identity']))
  return tlog.image_grid(source, driver, *imgs)


# ------------------------------------------------------------------------------ the stage

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       hooks: Sequence[loop.Hook] = ()) -> tb.BranchTrain:
  """Train (or resume) every G2D exit branch in `workdir` (train.py --stage=branches).

  Needs the backbone checkpoint and, when config.branches.use_bank, the frame banks of the
  train identities (build_bank.py). Writes `checkpoints/branches` (or `branches_nobank`),
  TensorBoard under `tensorboard/<stage>`, sample grids `samples/<stage>_<step>.png`
  (source | driver | bank frame | backbone | exits). Returns the final host train state."""
  from fiancee_jax import data as fdata  # noqa: PLC0415 (heavy: tfds)

  cfg.validate(config)
  b = config.branches
  stage = tb.stage_name(config)
  models, dp = compiled(config)
  parallel.check_batch_size(b.batch_size, dp.num_devices, 'branches.batch_size')
  frozen, g_meta = load_frozen(config, workdir, models)
  pcount, pindex = jax.process_count(), jax.process_index()
  is_chief = pindex == 0

  data_dir = cfg.data_dir(config, workdir)
  parallel.chief_first(lambda: fdata.prepare(config.data, data_dir), 'prepare')
  train_src = fdata.source(config.data, 'train', data_dir)

  ckpt = checkpoint.Checkpointer(workdir, stage, config, keep=config.train.keep_ckpts)
  writer = tlog.MetricWriter(os.path.join(workdir, 'tensorboard', stage), enabled=is_chief)
  try:
    host = create_train_state(config, models, tb.load_backbone_discriminator(workdir, config))
    loader_state = None
    if ckpt.latest_step() is not None:
      saved, meta = ckpt.restore(tb._saved(host))  # noqa: SLF001 (the shared payload)
      host, loader_state = saved['train'], meta.get('data')
      print(f'[{stage}] resumed from {ckpt.directory} at step {int(host.step)}', flush=True)
    loader = fdata.Loader(fdata.reenactment_pairs(train_src, config.seed),
                          b.batch_size, seed=config.seed + 11, shuffle=True,
                          process_index=pindex, process_count=pcount, state=loader_state,
                          transform=train_example)
    it = iter(loader)
    inputs = sample_inputs(config, train_src)
    start = int(host.step)
    extra = {'backbone_step': g_meta.get('step'), 'use_bank': models.use_bank,
             'num_steps': int(b.num_steps)}

    def step_fn(state):
      return dp(state, dp.put_batch(next(it)))

    def snapshot(step, state, write_samples, write_ckpt):
      host_now = dp.get_state(state.train)
      if write_samples and is_chief:  # the frozen arrays live in the (donated) device state
        grid = sample_grid(models, dp.one_copy(state.frozen), host_now, inputs)
        writer.image(step, f'{stage}/source_driver_frame_backbone_exits', grid)
        tlog.write_png(os.path.join(workdir, 'samples', f'{stage}_{step:07d}.png'), grid)
      if write_ckpt:
        ckpt.save(step, tb._saved(host_now), {'data': loader.state(), **extra})  # noqa: SLF001

    exit_totals = tuple(f'exit{k}/total' for k in models.exits)
    state = dp.put_state(tb.BranchState(train=host, frozen=frozen))
    state, _ = loop.run(
        state, start, loop.Cadence.of(b), name=stage, step_fn=step_fn, snapshot=snapshot,
        writer=writer, saved_step=start if ckpt.latest_step() == start else None, hooks=hooks,
        tag=stage, console=lambda m: {k: v for k, v in m.items()
                                      if k in CONSOLE_METRICS + exit_totals},
        hint='lower branches.lr or check the data')
    return dp.get_state(state.train)
  finally:
    ckpt.close()
    writer.close()

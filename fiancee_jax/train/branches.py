"""Branches stage: train every exit branch against a frozen backbone (Sec. 4.1, S1.1.2).

One pure per-device step (`train_step`) for all exits at once:
  * the frozen backbone (EMA weights, refreshed BN stats, eval mode) runs the shared prefix
    once, then the remaining blocks once: block features for every exit and the target image;
  * the bank guide (retrieval on the block-1 map) is computed once and shared by all exits;
  * branch update: sum over exits of L_OASIS (N+1 CE of D_k(branch_k image) with real
    targets) + alpha * VGG + beta * LPIPS against the backbone's image (Eq. S1; alpha 10,
    beta 5), Adam(0, 0.999), lr config.branches.lr;
  * discriminator update: each exit has its own copy of the backbone's trained OASIS
    discriminator (stacked on a leading axis and applied copy by copy, `state.per_copy`;
    independent Adam states), trained with the OASIS D losses (real = dataset image +
    label, fake = that exit's image, LabelMix with train.labelmix_lambda).
The branch step runs first (against the current discriminators) and the discriminators then
see the same (detached) branch images: one branch forward per step instead of two.

Frozen inputs (backbone variables, bank, LPIPS and VGG weights) ride in the state pytree
(`BranchState.frozen`, passed through unchanged) so they are jit arguments, never constants;
checkpoints hold only `BranchState.train` plus the branch variables for later stages.
Checkpoints: `<workdir>/checkpoints/branches` (guided) or `branches_nobank` (ablation).
"""
from __future__ import annotations

import dataclasses
import functools
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
from fiancee_jax import fiancee
from fiancee_jax.backbones.oasis import losses
from fiancee_jax.metrics import lpips as lpips_lib
from fiancee_jax.metrics import vgg_loss as vgg_lib
from fiancee_jax.backbones.oasis import discriminator as discriminators
from fiancee_jax.backbones.oasis import model as oasis
from fiancee_jax.nn.layers import torch_default_scale_sn_kernels
from fiancee_jax.train import backbone as bb
from fiancee_jax.train import checkpoint, loop, parallel
from fiancee_jax.train import logging as tlog
from fiancee_jax.train.state import adam, per_copy, split_variables

PyTree = Any


@flax.struct.dataclass
class BranchTrain:
  """What a branches checkpoint restores (exact resume)."""
  step: jax.Array
  params_b: PyTree          # OASISBranches params (all exits)
  state_b: PyTree           # branches' batch_stats / spectral
  params_d: PyTree          # discriminator copies, leading axis = exit
  state_d: PyTree
  opt_b: optax.OptState
  opt_d: optax.OptState
  rng: jax.Array


@flax.struct.dataclass
class Frozen:
  """Read-only inputs of the step (jit arguments, passed through unchanged)."""
  generator: PyTree         # backbone variables (EMA params + refreshed BN stats)
  bank: Any                 # fiancee_jax.bank.Bank or None
  lpips: PyTree
  vgg: PyTree


@flax.struct.dataclass
class BranchState:
  train: BranchTrain
  frozen: Frozen


@dataclasses.dataclass(frozen=True)
class Models:
  """Static half of the step (hashable by identity)."""
  generator: nn.Module          # frozen backbone, eval mode, no axis
  branches: nn.Module           # with axis_name: sync BN over devices
  discriminator: nn.Module
  tx_b: optax.GradientTransformation
  tx_d: optax.GradientTransformation
  exits: tuple[int, ...]
  use_bank: bool
  num_classes: int
  z_dim: int
  alpha_vgg: float
  beta_lpips: float
  labelmix_lambda: float
  prefix_stop: int
  key_block: int
  backend: str
  vgg_mode: str

  def __hash__(self):
    return id(self)


def stage_name(config) -> str:
  return fiancee.branches_subdir(bool(config.branches.use_bank))


def build_models(config: ml_collections.ConfigDict, axis_name: str | None = parallel.AXIS,
                 vgg_mode: str = 'caffe') -> Models:
  """Modules, optimisers and loss weights of the branches stage."""
  if config.backbone != 'oasis':
    raise ValueError(f'train.py --stage=branches: config.backbone={config.backbone!r}; only '
                     "'oasis' branch training is implemented here")
  b, t = config.branches, config.train
  use_bank = bool(b.use_bank)
  gen, br = fiancee.build_modules(config, use_bank=use_bank, axis_name=axis_name)
  return Models(
      generator=oasis.from_config(config), branches=br,
      discriminator=discriminators.from_config(config),
      tx_b=adam(b.lr, t.beta1, t.beta2, 0.0), tx_d=adam(b.lr, t.beta1, t.beta2, 0.0),
      exits=tuple(sorted(b.exits)), use_bank=use_bank, num_classes=config.data.num_classes,
      z_dim=config.model.z_dim, alpha_vgg=float(b.alpha_vgg), beta_lpips=float(b.beta_lpips),
      labelmix_lambda=float(t.labelmix_lambda),
      prefix_stop=fiancee.prefix_stop(config, use_bank), key_block=config.bank.key_block,
      backend=config.bank.backend, vgg_mode=vgg_mode)


def load_backbone_discriminator(workdir: str, config) -> tuple[PyTree, PyTree]:
  """(params, collections) of the trained backbone discriminator (the branches' D init)."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  ckpt = checkpoint.Checkpointer(workdir, 'backbone', config, read_only=True)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise checkpoint.CheckpointError(f'no backbone checkpoint in {ckpt.directory}: run '
                                       '`train.py --stage=backbone` first')
    ckpt.check_config(ckpt.read_meta(step))
    out = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    tr = out['state']['train']
    return tr['params_d'], dict(tr['state_d'])
  finally:
    ckpt.close()


def create_train_state(config, models: Models, gen_vars: PyTree, disc: tuple[PyTree, PyTree],
                       rng: jax.Array | None = None) -> BranchTrain:
  """Fresh branches + one copy of the backbone discriminator per exit (host arrays)."""
  rng = jax.random.PRNGKey(config.seed + 7) if rng is None else rng
  k_b, k_train = jax.random.split(rng)
  local = fiancee.build_modules(config, use_bank=models.use_bank)[1]
  b_vars = jax.jit(functools.partial(fiancee.init_branches, config, local))(gen_vars, k_b)
  params_b, state_b = split_variables(b_vars)
  if config.train.sn_kernel_init == 'torch_default':  # the backbone's SN parametrisation
    params_b = torch_default_scale_sn_kernels(params_b, state_b)
  e = len(models.exits)
  stack = lambda t: jax.tree.map(lambda x: np.stack([np.asarray(x)] * e), t)
  params_d, state_d = stack(disc[0]), stack(disc[1])
  return jax.device_get(BranchTrain(
      step=jnp.zeros((), jnp.int32), params_b=params_b, state_b=state_b, params_d=params_d,
      state_d=state_d, opt_b=models.tx_b.init(params_b), opt_d=models.tx_d.init(params_d),
      rng=k_train))


def frozen_forward(models: Models, frozen: Frozen, seg: jax.Array, z: jax.Array
                   ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array | None, jax.Array]:
  """(cond, block features, guide, backbone image) of the frozen backbone, prefix shared."""
  g, gv = models.generator, frozen.generator
  cond, feats = fiancee._prefix_impl(g, gv, seg, z, models.prefix_stop)  # noqa: SLF001
  x, more = fiancee._continue(g, gv, feats, cond, oasis.NUM_BLOCKS)  # noqa: SLF001
  feats = {**feats, **more}
  target = g.apply(gv, x, method='head')
  guide = None
  if models.use_bank:
    from fiancee_jax.core import bank as bank_lib  # noqa: PLC0415
    q = feats[f'block{models.key_block}']
    guide = bank_lib.retrieve(frozen.bank, q, bank_lib.grid_classes(seg, q.shape[1:3]),
                              backend=models.backend)
  return cond, feats, guide, target


def train_step(state: BranchState, batch: dict[str, jax.Array], *, models: Models,
               axis_name: str | None = parallel.AXIS) -> tuple[BranchState, dict]:
  """One iteration on this device's share of the batch: branch update, then D update."""
  tr, fr = state.train, state.frozen
  D, N = models.discriminator, models.num_classes
  real, labels = bb.preprocess(batch)
  b = labels.shape[0]
  first = lax.axis_index(axis_name) * b if axis_name is not None else 0
  k_z, k_lm = jax.random.split(jax.random.fold_in(tr.rng, tr.step))
  z = bb.sample_z(k_z, first + jnp.arange(b), models.z_dim)
  seg = jax.nn.one_hot(labels, N, dtype=jnp.float32)
  cond, feats, guide, target = jax.tree.map(lax.stop_gradient,
                                            frozen_forward(models, fr, seg, z))
  weights = losses.class_balancing_weights(labels, N, axis_name=axis_name)
  pmean = (lambda x: lax.pmean(x, axis_name)) if axis_name is not None else (lambda x: x)
  mut_b, mut_d = list(tr.state_b), list(tr.state_d)

  def disc(params, coll, image):
    (logits, _), new = D.apply({'params': params, **coll}, image, train=True, mutable=mut_d)
    return logits, {**coll, **new}

  # --- branches ----------------------------------------------------------------------------
  def b_loss_fn(params_b):
    imgs, new_sb = models.branches.apply({'params': params_b, **tr.state_b}, feats, cond,
                                         guide, True, mutable=mut_b)
    fakes = jnp.stack([imgs[k] for k in models.exits])
    logits, sd = per_copy(disc, tr.params_d, tr.state_d, fakes)
    # The backbone image's LPIPS / VGG features once for all exits.
    lp = jnp.mean(lpips_lib.to_reference(fr.lpips, target, fakes), axis=1)
    vg = (vgg_lib.to_reference(fr.vgg, target, fakes, models.vgg_mode)
          * vgg_lib.loss_scale(models.vgg_mode) if models.alpha_vgg > 0
          else jnp.zeros(len(models.exits)))
    m, total = {}, 0.0
    for i, k in enumerate(models.exits):
      adv = losses.n1_cross_entropy(logits[i], labels, for_real=True, weights=weights)
      total = total + adv + models.alpha_vgg * vg[i] + models.beta_lpips * lp[i]
      m.update({f'exit{k}/adv': adv, f'exit{k}/vgg': vg[i], f'exit{k}/lpips': lp[i]})
    m['b_total'] = total
    return total, ({**tr.state_b, **new_sb}, sd, fakes, m)

  (_, (state_b, state_d, fakes, b_metrics)), b_grads = jax.value_and_grad(
      b_loss_fn, has_aux=True)(tr.params_b)
  b_updates, opt_b = models.tx_b.update(pmean(b_grads), tr.opt_b, tr.params_b)
  params_b = optax.apply_updates(tr.params_b, b_updates)

  # --- discriminators (one per exit, OASIS losses) -----------------------------------------
  fakes = lax.stop_gradient(fakes)
  mask = losses.labelmix_mask(k_lm, labels, N)

  def d_loss_one(params_d, coll, fake):
    d_fake, coll = disc(params_d, coll, fake)
    d_real, coll = disc(params_d, coll, real)
    l_fake = losses.n1_cross_entropy(d_fake, labels, for_real=False)
    l_real = losses.n1_cross_entropy(d_real, labels, for_real=True, weights=weights)
    total, l_lm = l_fake + l_real, jnp.zeros(())
    if models.labelmix_lambda > 0:
      d_mixed, coll = disc(params_d, coll, losses.labelmix_images(mask, real, fake))
      l_lm = losses.labelmix_loss(mask, d_mixed, d_fake, d_real)
      total = total + models.labelmix_lambda * l_lm
    return total, (coll, jnp.stack([l_fake, l_real, l_lm]))

  def d_loss_fn(params_d):
    tot, (coll, parts) = per_copy(d_loss_one, params_d, state_d, fakes)
    return jnp.sum(tot), (coll, parts)

  (_, (state_d, d_parts)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(tr.params_d)
  d_updates, opt_d = models.tx_d.update(pmean(d_grads), tr.opt_d, tr.params_d)
  params_d = optax.apply_updates(tr.params_d, d_updates)
  d_metrics = {}
  for i, k in enumerate(models.exits):
    d_metrics.update({f'exit{k}/d_fake': d_parts[i, 0], f'exit{k}/d_real': d_parts[i, 1],
                      f'exit{k}/d_labelmix': d_parts[i, 2]})

  new_train = tr.replace(step=tr.step + 1, params_b=params_b, state_b=state_b,
                         params_d=params_d, state_d=state_d, opt_b=opt_b, opt_d=opt_d)
  return state.replace(train=new_train), pmean({**b_metrics, **d_metrics})


def make_step(models: Models) -> Callable[..., tuple[BranchState, dict]]:
  return functools.partial(train_step, models=models)


def _saved(host: BranchTrain) -> dict:
  """Checkpoint payload: the train state + the branch variables later stages load."""
  return {'train': host, 'branches': {'params': host.params_b, **host.state_b}}


def load_frozen(config, workdir: str, use_bank: bool) -> tuple[Frozen, dict, str]:
  """(Frozen inputs, backbone meta, VGG preprocess mode) for the branches stage."""
  try:
    g_params, g_coll, g_meta = checkpoint.load_backbone(workdir, config)
  except checkpoint.CheckpointError as e:
    raise fiancee.PipelineError(f'no backbone in {workdir} ({e}): run `python train.py '
                                f'--config ... --workdir {workdir} --stage=backbone`') from e
  bank = (fiancee.load_bank(config, workdir, backbone_step=g_meta.get('step'))
          if use_bank else None)
  vgg_params, vgg_mode = vgg_lib.load_params()
  frozen = Frozen(generator={'params': g_params, **g_coll}, bank=bank,
                  lpips=lpips_lib.load_params(), vgg=vgg_params)
  return frozen, g_meta, vgg_mode


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       hooks: Sequence[loop.Hook] = ()) -> BranchTrain:
  """Train (or resume) every exit branch in `workdir` (train.py --stage=branches).

  Needs the backbone checkpoint and, when config.branches.use_bank, the bank
  (build_bank.py). Writes `checkpoints/branches` (or `branches_nobank`), TensorBoard under
  `tensorboard/<stage>`, sample grids `samples/<stage>_<step>.png` (label | backbone | exits).
  Returns the final host train state. A head-avatar config trains its G2D branches in
  train/branches_heads.py."""
  if config.backbone == 'megaportraits':
    from fiancee_jax.train import branches_heads  # noqa: PLC0415
    return branches_heads.train_and_evaluate(config, workdir, hooks=hooks)
  from fiancee_jax import data as data_loader  # noqa: PLC0415 (heavy: tfds)

  cfg.validate(config)
  b = config.branches
  stage = stage_name(config)
  frozen, g_meta, vgg_mode = load_frozen(config, workdir, bool(b.use_bank))
  models = build_models(config, vgg_mode=vgg_mode)
  dp = parallel.wrap(make_step(models), config.parallel)
  parallel.check_batch_size(b.batch_size, dp.num_devices, 'branches.batch_size')
  pcount, pindex = jax.process_count(), jax.process_index()
  is_chief = pindex == 0

  data_dir = cfg.data_dir(config, workdir)
  parallel.chief_first(lambda: data_loader.prepare(config.data, data_dir), 'prepare')
  train_src = data_loader.source(config.data, 'train', data_dir)

  ckpt = checkpoint.Checkpointer(workdir, stage, config, keep=config.train.keep_ckpts)
  loader_state = None
  if ckpt.latest_step() is not None:
    template = create_train_state(config, models, frozen.generator,
                                  _disc_template(config, len(models.exits)))
    saved, meta = ckpt.restore(_saved(template))
    host, loader_state = saved['train'], meta.get('data')
    print(f'[{stage}] resumed from {ckpt.directory} at step {int(host.step)}', flush=True)
  else:
    host = create_train_state(config, models, frozen.generator,
                              load_backbone_discriminator(workdir, config))
  train_loader = data_loader.Loader(train_src, b.batch_size, seed=config.seed + 11,
                                    shuffle=True, process_index=pindex, process_count=pcount,
                                    state=loader_state)
  train_iter = iter(train_loader)
  sample_batch = next(iter(data_loader.Loader(train_src, min(4, b.batch_size),
                                              seed=config.seed, shuffle=False)))
  sample_z = np.asarray(jax.random.normal(jax.random.PRNGKey(config.seed + 2),
                                          (sample_batch['label'].shape[0], models.z_dim)))

  writer = tlog.MetricWriter(os.path.join(workdir, 'tensorboard', stage), enabled=is_chief)
  start = int(host.step)
  meta_extra = {'backbone_step': g_meta.get('step'), 'use_bank': bool(b.use_bank),
                'num_steps': int(b.num_steps)}

  def step_fn(state):
    return dp(state, dp.put_batch(next(train_iter)))

  def snapshot(step, state, write_samples, write_ckpt):
    host = dp.get_state(state.train)
    if write_samples and is_chief:  # the frozen arrays live in the (donated) device state
      grid = sample_grid_from(config, models, dp.one_copy(state.frozen), host,
                              np.asarray(sample_batch['label'], np.int32), sample_z)
      writer.image(step, f'{stage}/label_backbone_exits', grid)
      tlog.write_png(os.path.join(workdir, 'samples', f'{stage}_{step:07d}.png'), grid)
    if write_ckpt:
      ckpt.save(step, _saved(host), {'data': train_loader.state(), **meta_extra})

  try:
    state, _ = loop.run(
        dp.put_state(BranchState(train=host, frozen=frozen)), start, loop.Cadence.of(b),
        name=stage, step_fn=step_fn, snapshot=snapshot, writer=writer,
        saved_step=start if ckpt.latest_step() == start else None, hooks=hooks, tag=stage,
        console=lambda m: {k: v for k, v in m.items() if k == 'b_total' or k.endswith('/lpips')},
        hint='lower branches.lr or check the data')
    return dp.get_state(state.train)
  finally:
    ckpt.close()
    writer.close()


def _disc_template(config, e: int) -> tuple[PyTree, PyTree]:
  """Discriminator variables shaped like the backbone's (restore target; values unused)."""
  d = discriminators.from_config(config)
  img = jnp.zeros((1, config.data.height, config.data.width, 3), jnp.float32)
  v = jax.eval_shape(lambda k: d.init({'params': k}, img), jax.random.PRNGKey(0))
  params, coll = split_variables(v)
  zeros = lambda t: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), t)
  return zeros(params), zeros(coll)


# ------------------------------------------------------------------------------ evaluation

@functools.lru_cache(maxsize=8)
def _images_fn(pipeline: fiancee.Pipeline):
  def fn(params, labels, z):
    seg = jax.nn.one_hot(labels, pipeline.config.data.num_classes, dtype=jnp.float32)
    out = fiancee.all_images(pipeline, params, seg, z)
    return jnp.stack([out[k] for k in pipeline.exits] + [out['backbone']])
  return jax.jit(fn)


def sample_grid_from(config, models: Models, frozen: Frozen, host: BranchTrain,
                     labels: np.ndarray, z: np.ndarray) -> np.ndarray:
  """uint8 grid, one row per example: label | backbone | exit 1..E (training samples)."""
  gen, br = fiancee.build_modules(config, use_bank=models.use_bank)
  params = {'generator': frozen.generator, 'branches': {'params': host.params_b, **host.state_b},
            'predictor': None, 'bank': frozen.bank}
  p = fiancee.Pipeline(config, gen, br, None, frozen.bank, params, np.zeros(0), models.exits)
  imgs = np.asarray(_images_fn(p)(params, labels, z))
  return tlog.sample_grid(labels, imgs[-1], *imgs[:-1])


def _eval_config(config, use_bank: bool | None):
  if use_bank is None or bool(use_bank) == bool(config.branches.use_bank):
    return config
  c = ml_collections.ConfigDict(config.to_dict())
  c.branches.use_bank = bool(use_bank)
  return c


def eval_noises(config, n: int) -> np.ndarray:
  """Fixed evaluation noises (n, z_dim), independent of the bank's and training's."""
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xE7A1)
  return np.asarray(jax.random.normal(key, (n, config.model.z_dim)), np.float32)


def evaluate_exits(config, workdir: str, split: str = 'test', use_bank: bool | None = None, *,
                   num: int | None = None, batch_size: int = 8, fid: bool = True
                   ) -> dict[str, dict[str, float]]:
  """Per route (exit1..exitE, backbone): mean LPIPS vs the backbone's image, FID vs the real
  images of `split`, GMACs of the route (network + bank retrieval bound). FID here is a
  small-sample FID on synthetic data (a few hundred images: biased high, compare only
  numbers computed with the same n). `num`: first n maps of the split (default all)."""
  from fiancee_jax import data  # noqa: PLC0415
  from fiancee_jax.metrics import fid as fid_lib  # noqa: PLC0415
  c = _eval_config(config, use_bank)
  pipeline = fiancee.load_pipeline(c, workdir, stages=('backbone', 'bank', 'branches'))
  params = pipeline.params
  src = data.source(c.data, split, cfg.data_dir(c, workdir))
  n = len(src) if num is None else min(int(num), len(src))
  if n < 2:
    raise ValueError(f'evaluate_exits: split {split!r} has {n} images; need >= 2')
  zs = eval_noises(c, n)
  fn = _images_fn(pipeline)
  lp = lpips_lib.load()
  inception = fid_lib.load_inception() if fid else None
  names = [f'exit{k}' for k in pipeline.exits] + ['backbone']
  lp_sum = np.zeros(len(names))
  feats = {k: [] for k in names + ['real']}
  for s in range(0, n, batch_size):
    idx = list(range(s, min(n, s + batch_size)))
    pad = batch_size - len(idx)
    rows = [src[i] for i in idx] + [src[idx[-1]]] * pad
    labels = np.stack([np.asarray(r['label'], np.int32) for r in rows])
    z = np.concatenate([zs[idx], np.repeat(zs[idx[-1:]], pad, 0)])
    imgs = np.asarray(fn(params, labels, z))[:, :len(idx)]
    for i, name in enumerate(names):
      lp_sum[i] += float(np.sum(np.asarray(lp(jnp.asarray(imgs[i]), jnp.asarray(imgs[-1])))))
      if fid:
        feats[name].append(np.asarray(inception(jnp.asarray(imgs[i]))))
    if fid:
      real = np.stack([np.asarray(r['image'], np.float32) / 127.5 - 1.0 for r in rows[:len(idx)]])
      feats['real'].append(np.asarray(inception(jnp.asarray(real))))
  out = {}
  for i, name in enumerate(names):
    row = {'lpips': float(lp_sum[i] / n), 'gmacs': float(pipeline.costs[i]), 'n': n}
    if fid:
      row['fid'] = fid_lib.frechet_distance_features(np.concatenate(feats[name]),
                                                     np.concatenate(feats['real']))
    out[name] = row
  return out


def sample_grid(config, workdir: str, path: str, *, split: str = 'test',
                use_bank: bool | None = None, num: int = 4) -> np.ndarray:
  """Write a PNG (label | backbone | exit 1..E, one row per test map) and return it."""
  from fiancee_jax import data  # noqa: PLC0415
  c = _eval_config(config, use_bank)
  pipeline = fiancee.load_pipeline(c, workdir, stages=('backbone', 'bank', 'branches'))
  src = data.source(c.data, split, cfg.data_dir(c, workdir))
  n = min(num, len(src))
  labels = np.stack([np.asarray(src[i]['label'], np.int32) for i in range(n)])
  imgs = np.asarray(_images_fn(pipeline)(pipeline.params, labels, eval_noises(c, n)))
  grid = tlog.sample_grid(labels, imgs[-1], *imgs[:-1])
  tlog.write_png(path, grid)
  return grid

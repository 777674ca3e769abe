"""Branches stage: train every exit branch against a frozen backbone (Sec. 3.1, 4.1, 4.2,
S1.1.2, S1.2.2), written once for every backbone adapter.

One pure per-device step (`train_step`) for all exits at once:
  * the frozen backbone (EMA weights, refreshed BN stats, eval mode) runs through the core
    pipeline: the shared prefix once (`core.pipeline.prefix`), the guide from the bank once
    (`guide`, shared by every exit; none for the `branches.use_bank=False` ablation), then
    block by block to each exit (`continue_to`) and on to the head: the target image;
  * branch update: the sum over exits of the backbone's branch loss against the backbone's
    image (OASIS: Eq. S1 = N+1 cross entropy of D_k + alpha VGG + beta LPIPS; head avatars:
    Eq. S3 without gaze), each exit judged by its own copy of the backbone's trained
    discriminator (stacked on a leading axis, applied copy by copy: `state.per_copy`);
  * discriminator update: every copy (independent optimiser state) on the backbone's
    discriminator losses, real vs that exit's (detached) image from the branch update: one
    branch forward per step.
Options (config.branches, off in the paper's configs): init='backbone' starts each branch
as the trained blocks it mirrors, channels sliced (`BranchLosses.from_backbone`);
warmup_steps (-1: all) makes the first steps distillation steps (`BranchLosses.distill_loss`,
no discriminator forward or update), the paper's adversarial steps after them.
What differs per backbone (losses, optimisers, how a loader batch becomes route inputs, the
sample rows and grids) is the adapter's `BranchLosses` (`Backbone.branch_losses()`, in
`backbones/<name>/branch_losses.py`); the protocol is below.

Frozen inputs (backbone variables, bank, loss trunks) ride in the state pytree
(`BranchState.frozen`, passed through unchanged) so they are jit arguments, never constants;
checkpoints hold `BranchState.train` plus the branch variables later stages load
(`core.stages.load_branches`): `<workdir>/checkpoints/branches` (guided) or
`branches_nobank` (ablation). Param names are `branches_branch_{k}`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping, Protocol, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax import lax

from fiancee_jax import config as cfg
from fiancee_jax import workdir as wd
from fiancee_jax.core import pipeline as pl
from fiancee_jax.core import stages
from fiancee_jax.core.interface import Backbone
from fiancee_jax.errors import FianceeError
from fiancee_jax.train import checkpoint, loop, parallel
from fiancee_jax.train import logging as tlog
from fiancee_jax.train.state import split_variables

PyTree = Any
Array = jax.Array


class BranchLosses(Protocol):
  """What the branch-stage driver asks a backbone (`Backbone.branch_losses()`).

  Arrays: fakes (E, B, H, W, 3) = every exit's image, exits in order; target (B, H, W, 3) =
  the frozen backbone's image; images in [-1, 1]. params_d / state_d: the discriminator
  copies' params and other collections, leading axis E. Per-exit outputs are (E,) arrays,
  the driver names them `exit{k}/{name}`."""

  sample_tag: str                    # TensorBoard tag of the sample grid (after '<stage>/')
  console_terms: tuple[str, ...]     # per-exit metrics printed (with 'b_total')

  def optimizers(self) -> tuple[optax.GradientTransformation, optax.GradientTransformation,
                                float | optax.Schedule]:
    """(branch optimiser, discriminator optimiser, learning rate or schedule)."""

  def init_params(self, params_b: PyTree, state_b: PyTree) -> PyTree:
    """Fresh branch params after init (e.g. the backbone's spectral-norm parametrisation)."""

  def frozen(self) -> PyTree:
    """Read-only loss inputs (LPIPS / VGG trunks, None where unused)."""

  def bank_select(self, workdir: str) -> dict[str, Any]:
    """`Backbone.load_bank` selection for training (heads: the train identities)."""

  def train_loader(self, src: Any, batch_size: int, *, seed: int, state: dict | None,
                   process_index: int, process_count: int) -> Any:
    """Resumable shuffled batches of the train split (`fiancee_jax.data.Loader`)."""

  def step_inputs(self, batch: Mapping[str, Array], rng: Array, step: Array,
                  axis_name: str | None) -> tuple[tuple, dict[str, Array]]:
    """(route inputs of the batch, what the losses need besides the images)."""

  def branch_loss(self, fakes: Array, target: Array, aux: dict, params_d: PyTree,
                  state_d: PyTree, frozen: PyTree, axis_name: str | None
                  ) -> tuple[Array, tuple[PyTree, dict[str, Array]]]:
    """(per-exit branch loss (E,), (new state_d, per-exit metrics))."""

  def disc_loss(self, params_d: PyTree, state_d: PyTree, fakes: Array, target: Array,
                aux: dict, axis_name: str | None
                ) -> tuple[Array, tuple[PyTree, dict[str, Array]]]:
    """(per-copy discriminator loss (E,), (new state_d, per-exit metrics)); fakes detached."""

  def distill_loss(self, fakes: Array, target: Array, aux: dict, frozen: PyTree,
                   axis_name: str | None) -> tuple[Array, dict[str, Array]]:
    """Warm-up (branches.warmup_steps): (per-exit loss (E,), per-exit metrics) without
    discriminators."""

  def from_backbone(self, variables_b: PyTree, gen_vars: PyTree) -> PyTree:
    """branches.init='backbone': fresh branch variables ({'params', 'batch_stats', ...}) with
    what they share with the generator blocks they mirror copied from the trained backbone
    variables (channels sliced). Optional: an adapter without it rejects that init."""

  def sample_inputs(self, src: Any) -> tuple[tuple, tuple]:
    """Fixed training sample rows: (route inputs, what the grid shows beside the images)."""

  def eval_rows(self, src: Any, n: int) -> tuple[tuple, np.ndarray, tuple]:
    """The first n evaluation rows of a split: (route inputs, real images (n, H, W, 3) in
    [-1, 1] for FID, what the grid shows)."""

  def sample_grid(self, shown: tuple, images: Mapping[Any, np.ndarray],
                  exits: Sequence[int]) -> np.ndarray:
    """uint8 grid, one row per sample (`all_images` output)."""


@flax.struct.dataclass
class BranchTrain:
  """What a branches checkpoint restores (exact resume)."""
  step: jax.Array
  params_b: PyTree          # Branches params (all exits)
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
  bank: Any                 # what Backbone.load_bank returned, or None
  losses: PyTree            # BranchLosses.frozen()


@flax.struct.dataclass
class BranchState:
  train: BranchTrain
  frozen: Frozen


@dataclasses.dataclass(frozen=True, eq=False)
class Models:
  """Static half of the step (hashed by identity)."""
  backbone: Backbone
  pipeline: pl.Pipeline         # the frozen forward (adapter; branches with axis_name)
  discriminator: nn.Module
  losses: BranchLosses
  tx_b: optax.GradientTransformation
  tx_d: optax.GradientTransformation
  lr: float | optax.Schedule
  exits: tuple[int, ...]
  use_bank: bool

  @property
  def branches(self) -> nn.Module:
    return self.pipeline.branches


class BranchStageError(FianceeError):
  """The branch stage cannot start (a missing backbone stage)."""


def stage_name(backbone: Backbone) -> str:
  return wd.branches_stage(_use_bank(backbone))


def _use_bank(backbone: Backbone) -> bool:
  return bool(backbone.config.branches.use_bank) and backbone.has_bank


def _pipeline(backbone: Backbone, branches: nn.Module) -> pl.Pipeline:
  """A pipeline without params or costs (the functions take params explicitly)."""
  return pl.Pipeline(backbone, backbone.generator(), branches, None, {},
                     np.zeros(len(backbone.exits) + 1), backbone.exits)


def build_models(backbone: Backbone, axis_name: str | None = parallel.AXIS) -> Models:
  """Modules, optimisers and losses of the branches stage."""
  use_bank = _use_bank(backbone)
  losses = backbone.branch_losses()
  tx_b, tx_d, lr = losses.optimizers()
  br = backbone.branches(use_bank=use_bank, axis_name=axis_name)
  return Models(backbone=backbone, pipeline=_pipeline(backbone, br),
                discriminator=backbone.discriminator(), losses=losses, tx_b=tx_b, tx_d=tx_d,
                lr=lr, exits=backbone.exits, use_bank=use_bank)


def load_backbone_discriminator(backbone: Backbone, workdir: str) -> tuple[PyTree, PyTree]:
  """(params, collections) of the trained backbone discriminator (the copies' init)."""
  ckpt = checkpoint.Checkpointer(workdir, 'backbone', backbone.config, read_only=True)
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


def disc_template(backbone: Backbone) -> tuple[PyTree, PyTree]:
  """Discriminator variables shaped like the backbone's (restore target; values unused)."""
  d = backbone.discriminator()
  c = backbone.config.data
  img = jnp.zeros((1, c.height, c.width, 3), jnp.float32)
  v = jax.eval_shape(lambda k: d.init({'params': k}, img), jax.random.PRNGKey(0))
  params, coll = split_variables(v)
  zeros = lambda t: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), t)  # noqa: E731
  return zeros(params), zeros(coll)


def create_train_state(backbone: Backbone, models: Models, disc: tuple[PyTree, PyTree],
                       rng: jax.Array | None = None, generator: PyTree = None) -> BranchTrain:
  """Fresh branches + one copy of the backbone discriminator per exit (host arrays);
  branches.init='backbone' slices the branches from `generator` (the frozen backbone
  variables; `BranchLosses.from_backbone`)."""
  config = backbone.config
  rng = jax.random.PRNGKey(config.seed + 7) if rng is None else rng
  k_b, k_train = jax.random.split(rng)
  local = backbone.branches(use_bank=models.use_bank)
  b_vars = jax.jit(functools.partial(pl.init_branches, backbone, local))(k_b)
  params_b, state_b = split_variables(b_vars)
  params_b = jax.jit(models.losses.init_params)(params_b, state_b)  # one compile, not one per shape
  if config.branches.init == 'backbone' and generator is not None:
    if not hasattr(models.losses, 'from_backbone'):
      raise BranchStageError(f"branches.init='backbone': the {backbone.name} adapter cannot "
                             "slice branches from its backbone; use branches.init='random'")
    params_b, state_b = split_variables(models.losses.from_backbone(
        {'params': params_b, **state_b}, jax.device_get(generator)))
  e = len(models.exits)
  stack = lambda t: jax.tree.map(lambda x: np.stack([np.asarray(x)] * e), t)  # noqa: E731
  params_d, state_d = stack(disc[0]), stack(dict(disc[1]))
  return jax.device_get(BranchTrain(
      step=jnp.zeros((), jnp.int32), params_b=params_b, state_b=state_b, params_d=params_d,
      state_d=state_d, opt_b=jax.jit(models.tx_b.init)(params_b),
      opt_d=jax.jit(models.tx_d.init)(params_d), rng=k_train))


def continue_exported(backbone: Backbone, models: Models, workdir: str,
                      ckpt: checkpoint.Checkpointer, step: int) -> tuple[BranchTrain, Any]:
  """(train state, loader state) to go on training from an exported checkpoint (`python -m
  fiancee_jax.train.checkpoint --to`, e.g. the shipped branches copied into a workdir): its
  branch variables and step, the data position it recorded, a fresh optimiser and the
  discriminator copies from the backbone (the export dropped both). Not an exact resume: Adam's
  moments restart, so the next steps differ from those the full checkpoint would have taken."""
  meta = ckpt.read_meta(step)
  ckpt.check_config(meta)
  exported = ckpt.restore_untyped(step).get('branches')
  if exported is None:
    raise BranchStageError(f'{ckpt.directory}/{step}: an exported checkpoint without branch '
                           f"variables (it holds {meta.get('exported')})")
  host = create_train_state(backbone, models, load_backbone_discriminator(backbone, workdir))
  fresh = jax.tree.structure({'params': host.params_b, **host.state_b})
  if jax.tree.structure(exported) != fresh:
    raise BranchStageError(f'{ckpt.directory}/{step}: its branch variables do not match this '
                           'config\'s branches (another model or branch config)')
  params_b, state_b = split_variables(exported)
  params_b = jax.tree.map(np.asarray, params_b)
  state_b = jax.tree.map(np.asarray, state_b)
  host = host.replace(step=jnp.asarray(step, jnp.int32), params_b=params_b, state_b=state_b,
                      opt_b=jax.jit(models.tx_b.init)(params_b))
  return jax.device_get(host), meta.get('data')


def frozen_forward(models: Models, frozen: Frozen, inputs: tuple
                   ) -> tuple[dict[str, Array], Any, Array | None, Array]:
  """(block features of every exit, ctx, guide, backbone image): the prefix once, the guide
  once, each backbone block once."""
  p = models.pipeline
  params = {'generator': frozen.generator, 'bank': frozen.bank}
  pre = pl.prefix(p, params, *inputs)
  g = pl.guide(p, params, pre)
  feats = {}
  for k in models.exits:
    feats[f'block{k}'], pre = pl.continue_to(p, params, pre, k)
  return feats, pre.ctx, g, pl.head_image(p, params, pre)


def train_step(state: BranchState, batch: dict[str, jax.Array], *, models: Models,
               axis_name: str | None = parallel.AXIS, adversarial: bool = True
               ) -> tuple[BranchState, dict]:
  """One iteration on this device's share of the batch: branch update, then D update.
  `adversarial=False` (warm-up): `BranchLosses.distill_loss` only, D copies unchanged."""
  tr, fr = state.train, state.frozen
  losses = models.losses
  inputs, aux = losses.step_inputs(batch, tr.rng, tr.step, axis_name)
  feats, ctx, guide, target = jax.tree.map(lax.stop_gradient,
                                           frozen_forward(models, fr, inputs))
  pmean = (lambda x: lax.pmean(x, axis_name)) if axis_name is not None else (lambda x: x)

  def b_loss_fn(params_b):
    imgs, new_sb = models.branches.apply({'params': params_b, **tr.state_b}, feats, ctx,
                                         guide, True, mutable=list(tr.state_b))
    fakes = jnp.stack([imgs[k] for k in models.exits])
    if adversarial:
      totals, (sd, parts) = losses.branch_loss(fakes, target, aux, tr.params_d, tr.state_d,
                                               fr.losses, axis_name)
    else:
      (totals, parts), sd = losses.distill_loss(fakes, target, aux, fr.losses,
                                                axis_name), tr.state_d
    return jnp.sum(totals), ({**tr.state_b, **new_sb}, sd, fakes, parts)

  (b_total, (state_b, state_d, fakes, b_parts)), b_grads = jax.value_and_grad(
      b_loss_fn, has_aux=True)(tr.params_b)
  b_updates, opt_b = models.tx_b.update(pmean(b_grads), tr.opt_b, tr.params_b)
  params_b = optax.apply_updates(tr.params_b, b_updates)

  fakes = lax.stop_gradient(fakes)

  def d_loss_fn(params_d):
    totals, (sd, parts) = losses.disc_loss(params_d, state_d, fakes, target, aux, axis_name)
    return jnp.sum(totals), (sd, parts)

  params_d, opt_d, d_parts = tr.params_d, tr.opt_d, {}
  if adversarial:
    (_, (state_d, d_parts)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(params_d)
    d_updates, opt_d = models.tx_d.update(pmean(d_grads), opt_d, params_d)
    params_d = optax.apply_updates(params_d, d_updates)

  lr = models.lr(tr.step) if callable(models.lr) else models.lr
  metrics = {'b_total': b_total, 'lr': jnp.asarray(lr, jnp.float32)}
  for i, k in enumerate(models.exits):
    metrics.update({f'exit{k}/{n}': v[i] for n, v in {**b_parts, **d_parts}.items()})
  new_train = tr.replace(step=tr.step + 1, params_b=params_b, state_b=state_b,
                         params_d=params_d, state_d=state_d, opt_b=opt_b, opt_d=opt_d)
  return state.replace(train=new_train), pmean(metrics)


def make_step(models: Models, adversarial: bool = True) -> Callable[..., Any]:
  return functools.partial(train_step, models=models, adversarial=adversarial)


def saved(host: BranchTrain) -> dict:
  """Checkpoint payload: the train state + the branch variables later stages load."""
  return {'train': host, 'branches': {'params': host.params_b, **host.state_b}}


def load_frozen(backbone: Backbone, workdir: str, models: Models) -> tuple[Frozen, dict]:
  """(Frozen inputs, backbone meta): EMA backbone, the bank (when guided, the part
  `BranchLosses.bank_select` names) and the loss trunks."""
  gen_vars, g_meta = stages.load_backbone(backbone, workdir)
  bank = None
  if models.use_bank:
    bank = backbone.load_bank(workdir, g_meta.get('step'), True,
                              **models.losses.bank_select(workdir))
  return Frozen(generator=gen_vars, bank=bank, losses=models.losses.frozen()), g_meta


def images_fn(backbone: Backbone, use_bank: bool) -> Callable[..., dict[Any, np.ndarray]]:
  """(params, *route inputs) -> `core.pipeline.all_images` on the host ({k: exit k image,
  'backbone', 'pred_in'[, 'guide']}), jitted once with eval-mode branches; the caller keeps
  it (samples, evaluation)."""
  p = _pipeline(backbone, backbone.branches(use_bank=use_bank))

  def fn(params, *inputs):  # int and str keys do not sort: not a jit output pytree
    out = pl.all_images(p, params, *inputs)
    return [out[k] for k in p.exits], {n: v for n, v in out.items() if isinstance(n, str)}
  jitted = jax.jit(fn)

  def call(params, *inputs):
    exits, named = jitted(params, *inputs)
    return {**{k: np.asarray(x) for k, x in zip(p.exits, exits)},
            **{n: np.asarray(x) for n, x in named.items()}}
  return call


def train_and_evaluate(backbone: Backbone, workdir: str, *,
                       hooks: Sequence[loop.Hook] = ()) -> BranchTrain:
  """Train (or resume) every exit branch in `workdir` (train.py --stage=branches).

  Needs the backbone checkpoint and, when config.branches.use_bank, the bank
  (build_bank.py). Writes `checkpoints/branches` (or `branches_nobank`), TensorBoard under
  `tensorboard/<stage>`, sample grids `samples/<stage>_<step>.png` (what the backbone's
  `BranchLosses.sample_grid` shows | backbone | exits). Returns the final host state."""
  from fiancee_jax import data as fdata  # noqa: PLC0415 (heavy: tfds)

  config = backbone.config
  cfg.validate(config)
  b = config.branches
  models = build_models(backbone)
  stage = wd.branches_stage(models.use_bank)
  frozen, g_meta = load_frozen(backbone, workdir, models)
  dp = parallel.wrap(make_step(models), config.parallel)
  warm = parallel.wrap(make_step(models, adversarial=False), config.parallel)
  parallel.check_batch_size(b.batch_size, dp.num_devices, 'branches.batch_size')
  pcount, pindex = jax.process_count(), jax.process_index()
  is_chief = pindex == 0

  data_dir = wd.data_dir(config, workdir)
  parallel.chief_first(lambda: fdata.prepare(config.data, data_dir), 'prepare')
  train_src = fdata.source(config.data, 'train', data_dir)

  ckpt = checkpoint.Checkpointer(workdir, stage, config, keep=config.train.keep_ckpts)
  writer = tlog.MetricWriter(os.path.join(wd.root(workdir), 'tensorboard', stage),
                             enabled=is_chief)
  try:
    loader_state = None
    latest = ckpt.latest_step()
    if latest is not None and 'exported' in ckpt.read_meta(latest):
      host, loader_state = continue_exported(backbone, models, workdir, ckpt, latest)
      print(f'[{stage}] continuing from the exported branch variables in {ckpt.directory} at '
            f'step {latest}: fresh optimiser state, discriminator copies from the backbone',
            flush=True)
    elif latest is not None:
      template = create_train_state(backbone, models, disc_template(backbone))
      restored, meta = ckpt.restore(saved(template))
      host, loader_state = restored['train'], meta.get('data')
      print(f'[{stage}] resumed from {ckpt.directory} at step {int(host.step)}', flush=True)
    else:
      host = create_train_state(backbone, models, load_backbone_discriminator(backbone, workdir),
                                generator=frozen.generator)
    loader = models.losses.train_loader(train_src, b.batch_size, seed=config.seed + 11,
                                        state=loader_state, process_index=pindex,
                                        process_count=pcount)
    it = iter(loader)
    sample_inputs, shown = models.losses.sample_inputs(train_src)
    sample_fn = images_fn(backbone, models.use_bank)
    start = int(host.step)
    extra = {'backbone_step': g_meta.get('step'), 'use_bank': models.use_bank,
             'num_steps': int(b.num_steps), 'init': str(b.init),
             'warmup_steps': int(b.warmup_steps)}

    done = [start]   # steps taken: the first branches.warmup_steps distil (-1: all of them)

    def step_fn(state):
      fn = warm if b.warmup_steps < 0 or done[0] < int(b.warmup_steps) else dp
      done[0] += 1
      return fn(state, fn.put_batch(next(it)))

    def snapshot(step, state, write_samples, write_ckpt):
      host_now = dp.get_state(state.train)
      if write_samples and is_chief:  # the frozen arrays live in the (donated) device state
        fr = dp.one_copy(state.frozen)
        params = {'generator': fr.generator, 'bank': fr.bank,
                  'branches': {'params': host_now.params_b, **host_now.state_b}}
        imgs = sample_fn(params, *sample_inputs)
        grid = models.losses.sample_grid(shown, imgs, models.exits)
        writer.image(step, f'{stage}/{models.losses.sample_tag}', grid)
        tlog.write_png(os.path.join(wd.root(workdir), 'samples', f'{stage}_{step:07d}.png'),
                       grid)
      if write_ckpt:
        ckpt.save(step, saved(host_now), {'data': loader.state(), **extra})

    terms = tuple(f'/{t}' for t in models.losses.console_terms)
    state, _ = loop.run(
        dp.put_state(BranchState(train=host, frozen=frozen)), start, loop.Cadence.of(b),
        name=stage, step_fn=step_fn, snapshot=snapshot, writer=writer,
        saved_step=start if ckpt.latest_step() == start else None, hooks=hooks, tag=stage,
        console=lambda m: {k: v for k, v in m.items() if k == 'b_total' or k.endswith(terms)},
        hint='lower branches.lr or check the data')
    return dp.get_state(state.train)
  finally:
    ckpt.close()
    writer.close()


# ------------------------------------------------------------------------------ evaluation

def _eval_rows(backbone: Backbone, workdir: str, split: str, num: int | None):
  from fiancee_jax import data as fdata  # noqa: PLC0415 (heavy: tfds)
  c = backbone.config
  src = fdata.source(c.data, split, wd.data_dir(c, workdir))
  n = len(src) if num is None else min(int(num), len(src))
  return n, src


def sample_grid(backbone: Backbone, workdir: str, path: str, *, split: str = 'test',
                use_bank: bool | None = None, num: int = 4) -> np.ndarray:
  """Write a PNG (what `BranchLosses.sample_grid` shows | backbone | exit 1..E, one row per
  row of `split`) and return it."""
  p = stages.load_pipeline(backbone, workdir, stages=('backbone', 'bank', 'branches'),
                           use_bank=use_bank)
  n, src = _eval_rows(backbone, workdir, split, num)
  losses = backbone.branch_losses()
  inputs, _, shown = losses.eval_rows(src, n)
  imgs = images_fn(backbone, p.use_bank)(p.params, *inputs)
  grid = losses.sample_grid(shown, imgs, p.exits)
  tlog.write_png(path, grid)
  return grid

"""Backbone stage: train a backbone generator + its discriminator (Sec. 4.1 OASIS, Sec. 4.2
head avatars), one driver for every backbone adapter.

`train_and_evaluate(backbone, workdir)` (train.py --stage=backbone) runs the stage: data,
resume, loop, progress, TensorBoard, samples, checkpoints, clean stop on SIGTERM / Ctrl-C.
What differs per backbone (losses, the per-device step, how loader batches look, the sample
rows and grid, the inputs of the BN refresh) is the adapter's `GANTask`
(`Backbone.gan_task(axis_name)`, in `backbones/<name>/gan.py`); the protocol is below.

The step's state is a `StepState`: the checkpointed `GANState` (G, D, the EMA generator, both
optimiser states, the base rng) plus the frozen arrays of the losses (jit arguments, never
constants). The step is data parallel over `parallel.AXIS` (`train.parallel`): gradients and
metrics are averaged over it, the models' sync batch norm averages statistics over it, so N
devices on a global batch equal one device on that batch.

Checkpoints: `<workdir>/checkpoints/backbone/<step>` = {'train': GANState, 'ema_bn': the EMA
generator's collections after `train.bn_refresh_batches` train-mode batches (OASIS evaluates
EMA weights that way)} + the data position; later stages read the EMA generator with
`checkpoint.load_backbone` / `core.stages.load_backbone`. Samples of the refreshed EMA
generator: `<workdir>/samples/step_<n>.png` and TensorBoard `samples/<task.sample_tag>`.

Compiled code: a `Compiled` (made by `compiled(backbone)`) holds the jitted step, init,
sampler and BN-refresh apply of one `GANTask.compile_key()`; the caller owns it and may pass
it to several runs (a resumed run in one process, tests) so they compile once.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterator, Protocol, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fiancee_jax import config as cfg
from fiancee_jax import data as fdata
from fiancee_jax import workdir as wd
from fiancee_jax.core.interface import Backbone
from fiancee_jax.errors import FianceeError
from fiancee_jax.train import bn_refresh, checkpoint, loop, parallel
from fiancee_jax.train import logging as tlog
from fiancee_jax.train.state import GANState, StepState, split_variables

STAGE = 'backbone'
PyTree = Any
Array = jax.Array


class GANTask(Protocol):
  """What the GAN-stage driver asks a backbone (`Backbone.gan_task(axis_name)`).

  Images are NHWC; loader batches are numpy dicts (this process's share of the global batch,
  uint8 images); `variables` are Flax variable dicts ({'params': ..., **collections}).
  Everything but the data methods is pure and jittable; the driver jits it (`Compiled`)."""

  config: ml_collections.ConfigDict
  axis_name: str | None                  # data axis of the generator's sync BN (None: one device)
  tx_g: optax.GradientTransformation
  tx_d: optax.GradientTransformation
  sample_tag: str                        # TensorBoard tag of the sample grid, after 'samples/'
  console_metrics: tuple[str, ...] | None   # metrics printed at log steps (None: all; TB: all)

  def compile_key(self) -> str:
    """The config values the jitted functions depend on (equal keys: one compilation)."""

  def init_variables(self, k_g: Array, k_d: Array) -> tuple[PyTree, PyTree]:
    """Fresh (generator variables, discriminator variables) from two keys."""

  def init_params(self, params_g: PyTree, state_g: PyTree, params_d: PyTree, state_d: PyTree
                  ) -> tuple[PyTree, PyTree]:
    """(params_g, params_d) after init, on the host (e.g. OASIS's spectral-norm rescale)."""

  def frozen(self) -> dict[str, PyTree]:
    """Read-only arrays of the losses (the VGG trunk), host or device arrays; {} if none."""

  def train_step(self, carry: StepState, batch: dict[str, Array], *,
                 axis_name: str | None = parallel.AXIS) -> tuple[StepState, dict[str, Array]]:
    """One iteration on this device's share of a `loader` batch: G and D updates, the EMA
    of the generator, step + 1; metrics averaged over `axis_name`."""

  def loader(self, src: Any, batch_size: int, *, seed: int, shuffle: bool = True,
             state: dict | None = None, process_index: int = 0,
             process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Resumable batches of the train split `src` (a `fiancee_jax.data.Loader`: `.state()`),
    exactly what `train_step` reads."""

  def refresh_batches(self, batches: Iterator[dict[str, np.ndarray]], num: int
                      ) -> Iterator[PyTree]:
    """`num` inputs of `refresh_apply` made from `loader` batches."""

  def refresh_apply(self, variables: PyTree, batch: PyTree) -> tuple[Any, PyTree]:
    """A train-mode forward of the generator without a data axis on one `refresh_batches`
    item: (outputs, mutated collections)."""

  def sample_inputs(self, src: Any) -> dict[str, np.ndarray]:
    """The fixed rows of the sample grid (what `sample` and `sample_grid` read)."""

  def sample(self, params: PyTree, collections: dict[str, PyTree],
             inputs: dict[str, np.ndarray]) -> Array:
    """Eval-mode images (N, H, W, 3) in [-1, 1] of the sample rows."""

  def sample_grid(self, inputs: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """uint8 grid, one row per sample."""


class GANStageError(FianceeError):
  """The backbone stage cannot run as asked."""


class Compiled:
  """The jitted half of the stage for one `GANTask.compile_key()`: the data-parallel step
  (`step`, a `parallel.DataParallel`, built on first use), init, sampler and the BN-refresh
  apply. Each compiles on its first call; the caller owns the object and passes it to
  several `train_and_evaluate` / `create_train_state` calls of configs with that key."""

  def __init__(self, task: GANTask, mode: str = 'shard_map', devices: list | None = None):
    self.task, self.key = task, task.compile_key()
    self.init = jax.jit(task.init_variables)
    self.sample = jax.jit(task.sample)
    self.refresh = bn_refresh.compile_update(task.refresh_apply)
    self._mode, self._devices = mode, devices

  @functools.cached_property
  def step(self) -> parallel.DataParallel:
    if self.task.axis_name is None:
      raise GANStageError('Compiled.step: the task was made with axis_name=None (one device, '
                          'no data axis); make it with gan_task(parallel.AXIS)')
    return parallel.wrap(self.task.train_step, self._mode, self._devices, self.task.axis_name)

  def check(self, task: GANTask) -> None:
    """One clear error when `task` (this run's config) needs other compiled code."""
    if task.compile_key() != self.key:
      raise GANStageError(f'the Compiled passed in was made for another model / optimiser '
                          f'config than {task.config.get("name", "this config")!r}: make one '
                          'with gan.compiled(backbone) for this config')


def compiled(backbone: Backbone, devices: list | None = None) -> Compiled:
  """The compiled half of `backbone`'s stage (data parallel over `devices`, default all, in
  the config's `parallel` mode)."""
  return Compiled(backbone.gan_task(parallel.AXIS), backbone.config.parallel, devices)


def create_train_state(backbone: Backbone, comp: Compiled | None = None,
                       rng: Array | None = None) -> GANState:
  """Initial state (host arrays): G, D, EMA = copy of G, optimiser states, base rng
  (default PRNGKey(config.seed) split into G, D and train keys)."""
  task = backbone.gan_task(None)
  init = jax.jit(task.init_variables) if comp is None else comp.init
  if comp is not None:
    comp.check(task)
  rng = jax.random.PRNGKey(backbone.config.seed) if rng is None else rng
  k_g, k_d, k_train = jax.random.split(rng, 3)
  g_vars, d_vars = init(k_g, k_d)

  def finish(g_vars, d_vars, k_train):
    params_g, state_g = split_variables(g_vars)
    params_d, state_d = split_variables(d_vars)
    params_g, params_d = task.init_params(params_g, state_g, params_d, state_d)
    return GANState(
        step=jnp.zeros((), jnp.int32), params_g=params_g, params_d=params_d,
        state_g=state_g, state_d=state_d, ema_params_g=params_g, ema_state_g=state_g,
        opt_g=task.tx_g.init(params_g), opt_d=task.tx_d.init(params_d), rng=k_train)
  # one program: run eagerly, the optimiser's zeros and the kernel rescaling compiled one
  # small program per parameter shape (~60 compiles, most of a tiny config's start-up)
  return jax.device_get(jax.jit(finish)(g_vars, d_vars, k_train))


def step_state(task: GANTask, train: GANState) -> StepState:
  """A train state with the frozen arrays the step reads."""
  return StepState(train=train, frozen=task.frozen())


def refresh_ema_stats(comp: Compiled, task: GANTask, state: GANState,
                      batches: Iterator[dict], num: int) -> dict[str, PyTree]:
  """EMA generator collections after `num` train-mode batches (OASIS: 50; train/bn_refresh)."""
  return bn_refresh.refresh_bn_stats(comp.refresh, state.ema_params_g,
                                     dict(state.ema_state_g), task.refresh_batches(batches, num))


def sample_grid(comp: Compiled, task: GANTask, params: PyTree, collections: dict[str, PyTree],
                inputs: dict[str, np.ndarray]) -> np.ndarray:
  """uint8 grid of the generator (params, collections) on the fixed sample rows."""
  return task.sample_grid(inputs, np.asarray(comp.sample(params, collections, inputs)))


# ----------------------------------------------------------------------------------------
# The stage.


def train_and_evaluate(backbone: Backbone, workdir: str, *, hooks: Sequence[loop.Hook] = (),
                       comp: Compiled | None = None) -> GANState:
  """Train (or resume) `backbone`'s generator + discriminator in `workdir`; returns the final
  host state. `hooks(step, device_state, metrics)` run after each step (tests use them);
  `comp` (from `compiled(backbone)`) reuses code compiled by an earlier run."""
  config = backbone.config
  cfg.validate(config)
  return checkpoint.with_stage(workdir, STAGE, config, config.train.keep_ckpts,
                               lambda ckpt: _train(backbone, workdir, ckpt, hooks, comp))


def _train(backbone: Backbone, workdir: str, ckpt: checkpoint.Checkpointer,
           hooks: Sequence[loop.Hook], comp: Compiled | None) -> GANState:
  config = backbone.config
  t = config.train
  task = backbone.gan_task(parallel.AXIS)
  if comp is None:
    comp = Compiled(task, config.parallel)
  comp.check(task)
  dp = comp.step
  parallel.check_batch_size(t.batch_size, dp.num_devices)
  pcount, pindex = jax.process_count(), jax.process_index()
  is_chief = pindex == 0

  data_dir = wd.data_dir(config, workdir)
  parallel.chief_first(lambda: fdata.prepare(config.data, data_dir), 'prepare')
  train_src = fdata.source(config.data, 'train', data_dir)

  host_state, loader_state = ckpt.resume_gan(create_train_state(backbone, comp), STAGE)
  train_loader = task.loader(train_src, t.batch_size, seed=config.seed, state=loader_state,
                             process_index=pindex, process_count=pcount)
  refresh_bs = max(1, min(t.batch_size, 8, len(train_src)))
  inputs = task.sample_inputs(train_src)
  writer = tlog.MetricWriter(os.path.join(wd.root(workdir), 'tensorboard'), enabled=is_chief)
  start = int(host_state.step)

  def step_fn(state):
    return dp(state, dp.put_batch(next(train_loader)))

  def snapshot(step, state, write_samples, write_ckpt):
    host = dp.get_state(state.train)
    # Process 0 refreshes: its samples, and the checkpoint's host arrays are its own (orbax
    # writes host arrays from process 0 only); the others pass a placeholder of that shape.
    # The refresh batches are the same whatever the process count.
    refreshed = refresh_ema_stats(
        comp, task, host, task.loader(train_src, refresh_bs, seed=config.seed + 1),
        t.bn_refresh_batches) if is_chief else host.ema_state_g
    if write_samples and is_chief:
      grid = sample_grid(comp, task, host.ema_params_g, refreshed, inputs)
      writer.image(step, f'samples/{task.sample_tag}', grid)
      tlog.write_png(os.path.join(wd.root(workdir), 'samples', f'step_{step:07d}.png'), grid)
    if write_ckpt:
      # Host arrays (process 0 writes them; orbax refuses a one-device jax.Array when
      # there are several processes).
      ckpt.save(step, {'train': host, 'ema_bn': jax.device_get(refreshed)},
                {'data': train_loader.state(), 'num_steps': int(t.num_steps)})

  keep = task.console_metrics
  console: Callable | None = None if keep is None else (
      lambda m: {k: v for k, v in m.items() if k in keep})
  try:
    state, _ = loop.run(
        dp.put_state(step_state(task, host_state)), start, loop.Cadence.of(t), name=STAGE,
        step_fn=step_fn, snapshot=snapshot, writer=writer,
        saved_step=start if ckpt.latest_step() == start else None, hooks=hooks,
        console=console, hint='lower train.lr_g / train.lr_d or check the data')
    return dp.get_state(state.train)
  finally:
    writer.close()

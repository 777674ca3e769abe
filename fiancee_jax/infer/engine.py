"""The compiled inference pipeline (`Engine`) and routing of one input or a batch (Sec. 3.2).

One input: backbone prefix -> predictor -> the cheapest exit whose predicted LPIPS (+ the
routing rule's offset: `infer.rules`, by default the conformal one) is <= the threshold -> that route, continuing from the prefix,
all in one jitted call (`Engine.routed_one`: `routing.routed_apply`, whose `lax.switch` runs
only the chosen route; the guide is retrieved inside the exit routes, not for the backbone's).
A batch (`Engine.routed_batch`): one jitted call (prefix, predictor, exit choice, guide) whose
B int32 exits alone come to the host, then per (route, bucket size) one jitted call that
gathers its rows of the prefix and continues the route from there, the images put back in
order once; sharded over the local devices when there are several.

Route inputs are the adapter's (`Backbone.abstract_inputs`; OASIS: labels (B, H, W) int32 and
z (B, z_dim); head avatars: source, driver (B, H, W, 3) in [-1, 1] and the source identity
(B,)). An `Engine` is built once by its caller from a `core.pipeline.Pipeline`; params stay jit
arguments (`engine.params`, or others of the same shapes).
"""
from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fiancee_jax import workdir as wd
from fiancee_jax.core import pipeline as pl
from fiancee_jax.core import routing, stages
from fiancee_jax.core.interface import Backbone
from fiancee_jax.infer import inputs as inputs_lib
from fiancee_jax.infer import rules
from fiancee_jax.infer.inputs import TARGET_LPIPS

PyTree = Any


# ---------------------------------------------------------------------------------------------
# Timing.


def block(x: Any) -> Any:
  return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, 'block_until_ready')
                                else a, x)


def time_fn(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
  """Median wall-clock seconds of fn() (outputs blocked on), after `warmup` calls."""
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(max(repeats, 1)):
    t0 = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def paired_times(fa: Callable[[], Any], fb: Callable[[], Any],
                 repeats: int = 5) -> tuple[float, float]:
  """Median wall-clock seconds of fa() and fb() timed in alternation (A B A B ..., one warm-up
  call each): load that drifts on a shared machine hits both alike."""
  block(fa())
  block(fb())
  ta, tb = [], []
  for _ in range(max(repeats, 1)):
    for fn, out in ((fa, ta), (fb, tb)):
      t0 = time.perf_counter()
      block(fn())
      out.append(time.perf_counter() - t0)
  return statistics.median(ta), statistics.median(tb)


def routing_cost(engine: 'Engine', x: tuple, repeats: int = 30) -> dict[str, Any]:
  """What routing adds to a route at batch 1: `routed_one` made to take the cheapest exit
  (threshold 1e6, offset 0: every prediction is under it) against that exit's route alone on
  the same input `x` (a tuple of batch-1 arrays), paired medians. Both run the prefix once, the
  retrieval and the branch; the difference is predictor, choice and switch."""
  params = engine.params
  cheapest = int(np.argmin(engine.costs))
  big, zero = jnp.float32(1e6), jnp.float32(0.0)
  c32 = jnp.asarray(engine.costs, jnp.float32)
  forced, alone = paired_times(lambda: engine.routed_one(params, x, big, c32, zero),
                               lambda: engine.routes[cheapest](params, *x), repeats)
  taken = int(engine.routed_one(params, x, big, c32, zero)[1]['exit'])
  return {'cheapest_route': engine.route_name(cheapest), 'forced_exit': engine.route_name(taken),
          'routed_forced_ms': 1e3 * forced, 'route_alone_ms': 1e3 * alone,
          'share_of_cheapest': (forced - alone) / alone, 'repeats': int(repeats)}


def device_name() -> str:
  d = jax.devices()[0]
  kind = getattr(d, 'device_kind', d.platform)
  return f'{d.platform}:{kind} ({platform.processor() or platform.machine()}, ' \
         f'{os.cpu_count()} cpus)' if d.platform == 'cpu' else f'{d.platform}:{kind}'


# ---------------------------------------------------------------------------------------------
# The compiled pipeline.


class _AOT:
  """A jitted `fn(params, *args)` compiled ahead of time for given shapes: `warm(*abstract)`
  lowers and compiles (`.lower().compile()`); a later call with those shapes goes through the
  jitted function, which traces again (cheap) but takes the executable XLA already compiled
  instead of compiling. (Calls go through jit, not the `Compiled` object: with the pipeline's
  ~650 param leaves, `Compiled.__call__` took ~80 ms of host time per call on our CPU, the
  jit dispatch a fraction of a millisecond.)"""

  def __init__(self, fn: Callable[..., Any]):
    self.jit = jax.jit(fn)
    self.compiled: dict[Any, Any] = {}

  @staticmethod
  def key(args: Sequence[Any]) -> tuple:
    return tuple((tuple(getattr(a, 'shape', ())), str(getattr(a, 'dtype', type(a).__name__)))
                 for a in jax.tree_util.tree_leaves(args))

  def warm(self, params: Any, *args: Any) -> Any:
    k = self.key(args)
    if k not in self.compiled:
      self.compiled[k] = self.jit.lower(params, *args).compile()
    return self.compiled[k]

  def __call__(self, params: Any, *args: Any) -> Any:
    return self.jit(params, *args)


class Engine:
  """Jitted functions of one pipeline, each `fn(params, *inputs)` (inputs with a leading batch
  axis B):

    predict(params, *x)      -> (B, E) predicted LPIPS (prefix + predictor)
    prefix(params, *x)       -> the `Prefix` (what every route shares)
    guide(params, *x)        -> (the `Prefix`, the bank's guide (B, ...) or None when unguided)
    routed_one(params, x, threshold, costs, offset) -> (image (1, H, W, 3), {'exit', 'pred_lpips'})
    choose(params, x, threshold, costs, offset) -> (exits (B,) int32, pred (B, E), Prefix, guide)
    from_prefix[r](params, pre, guide, rows) -> image of route r for the prefix rows `rows`
    all(params, *x)          -> ([image of every route, route order], {'pred_in', 'guide'})
    routes[r](params, *x)    -> image of route r only from the raw inputs (references, latency)

  `routed_one` and `choose` / `from_prefix` (the batched path, `routed_batch`) are compiled
  ahead of time by `warm` (at construction with `warm=True`: batch 1). With several local
  devices, batches are sharded over them (`put`).
  """

  def __init__(self, pipeline: pl.Pipeline, backend: str | None = None, warm: bool = False):
    p = self.pipeline = pipeline
    self.backend = backend
    self.exits = tuple(int(k) for k in p.exits)
    self.costs = np.asarray(p.costs, np.float64)
    n = len(self.exits)
    devices = jax.local_devices()
    self.mesh = Mesh(np.array(devices), ('data',)) if len(devices) > 1 else None

    def predict(params, *x):
      return pl.predict(p, params, pl.prefix(p, params, *x))

    def guide(params, *x):   # the prefix too: what a guided route runs before its blocks
      pre = pl.prefix(p, params, *x)
      return pre, pl.guide(p, params, pre, backend)

    def route_from(r, params, pre):   # the guide only on the exits' routes
      g = pl.guide(p, params, pre, backend) if r < n else None
      return pl.route_image(p, params, r, pre, g)

    def routed_one(params, x, threshold, costs, offset):
      return routing.routed_apply(
          lambda prm, xx: pl.prefix(p, prm, *xx),
          lambda prm, pre: pl.predict(p, prm, pre)[0],
          tuple(functools.partial(route_from, r) for r in range(n + 1)),
          params, tuple(x), threshold, costs, offset)

    def choose(params, x, threshold, costs, offset):
      pre = pl.prefix(p, params, *x)
      pred = pl.predict(p, params, pre)
      return (routing.choose_exit(pred, threshold, costs, offset), pred, pre,
              pl.guide(p, params, pre, backend))

    def from_prefix(r, params, pre, g, rows):   # gather rows of the prefix, continue route r
      sub = jax.tree_util.tree_map(lambda a: jnp.take(a, rows, axis=0), pre)
      gs = None if g is None or r == n else jax.tree_util.tree_map(
          lambda a: jnp.take(a, rows, axis=0), g)
      if self.mesh is not None and rows.shape[0] % len(devices) == 0:
        spec = NamedSharding(self.mesh, PartitionSpec('data'))
        sub, gs = jax.lax.with_sharding_constraint((sub, gs), spec)
      return pl.route_image(p, params, r, sub, gs)

    def every(params, *x):  # a list in route order (int and str dict keys do not sort)
      out = pl.all_images(p, params, *x, backend=backend)
      return ([out[k] for k in list(self.exits) + ['backbone']],
              {'pred_in': out['pred_in'], 'guide': out.get('guide')})

    self.predict = jax.jit(predict)
    self.prefix = jax.jit(functools.partial(pl.prefix, p))
    self.guide = jax.jit(guide)
    self.routed_one = _AOT(routed_one)
    self.choose = _AOT(choose)
    self.from_prefix = [_AOT(functools.partial(from_prefix, r)) for r in range(n + 1)]
    self.all = jax.jit(every)
    self.routes = [jax.jit(r) for r in pl.route_fns(p, backend)]
    # the batched path's params: replicated over the local devices (batch 1 stays on one)
    self.batch_params = p.params if self.mesh is None else jax.device_put(
        p.params, NamedSharding(self.mesh, PartitionSpec()))
    self.warm_s = self.warm() if warm else 0.0

  @property
  def params(self) -> dict:
    return self.pipeline.params

  @property
  def config(self):
    return self.pipeline.config

  @property
  def num_devices(self) -> int:
    return 1 if self.mesh is None else int(self.mesh.size)

  def route_name(self, route: int) -> str:
    return f'exit{self.exits[route]}' if route < len(self.exits) else 'backbone'

  # ------------------------------------------------------------------ ahead-of-time compiles

  def _scalars(self) -> tuple:
    f32 = jax.ShapeDtypeStruct((), jnp.float32)
    return f32, jax.ShapeDtypeStruct(self.costs.shape, jnp.float32), f32

  def _abstract(self, like: Sequence[Any], batch: int, sharded: bool) -> tuple:
    sharding = (NamedSharding(self.mesh, PartitionSpec('data'))
                if sharded and self.mesh is not None else None)
    return tuple(jax.ShapeDtypeStruct((batch,) + tuple(a.shape[1:]), a.dtype, sharding=sharding)
                 for a in like)

  def warm(self, batch: int | None = None, bucket_sizes: Sequence[int] | None = None,
           like: Sequence[Any] | None = None, routes: bool = True) -> float:
    """Compile ahead of time (`.lower().compile()`): `routed_one` at batch 1; with `batch`,
    also the batched path for chunks of `batch` inputs (`choose`, padded to the device count,
    and every route's `from_prefix` at each bucket size <= batch). `like`: route inputs
    (arrays or shapes, any batch) whose shapes and dtypes the calls will have (default the
    adapter's `abstract_inputs`; OASIS label ids (B, H, W) int32 are another valid form).
    `routes=False`: the choice call only (the routes then compile at their first use: only
    the (route, bucket) pairs a stream meets). Returns the seconds."""
    t0 = time.perf_counter()
    (t, c, o) = self._scalars()
    like = tuple(like if like is not None else self.pipeline.backbone.abstract_inputs(1))
    self.routed_one.warm(self.params, self._abstract(like, 1, False), t, c, o)
    params = self.batch_params
    if batch:
      x = self._abstract(like, self._padded(int(batch)), True)
      comp = self.choose.warm(params, x, t, c, o)
      outs = jax.eval_shape(self.choose.jit, params, x, t, c, o)
      shard = jax.tree_util.tree_leaves(comp.output_shardings)
      leaves, tree = jax.tree_util.tree_flatten(outs)
      outs = jax.tree_util.tree_unflatten(tree, [
          jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) for a, s in zip(leaves, shard)])
      _, _, pre, g = outs
      for b in (bucket_sizes or self.config.routing.bucket_sizes) if routes else ():
        if b <= batch:
          rows = jax.ShapeDtypeStruct((int(b),), jnp.int32)
          for fn in self.from_prefix:
            fn.warm(params, pre, g, rows)
    return time.perf_counter() - t0

  # ------------------------------------------------------------------ the batched path

  def _padded(self, batch: int) -> int:
    d = self.num_devices
    return -(-batch // d) * d

  def put(self, inputs: Sequence[Any]) -> tuple[tuple, int]:
    """Route inputs on device: padded (last row repeated) to a multiple of the local device
    count and sharded over the devices along the batch axis when there are several.
    Returns (inputs, B)."""
    inputs = tuple(np.asarray(x) if not isinstance(x, jax.Array) else x for x in inputs)
    batch = int(inputs[0].shape[0])
    if self.mesh is None:
      return tuple(jnp.asarray(x) for x in inputs), batch
    padded = self._padded(batch)
    if padded != batch:
      inputs = tuple(jnp.concatenate([x, jnp.repeat(x[-1:], padded - batch, axis=0)])
                     for x in inputs)
    spec = NamedSharding(self.mesh, PartitionSpec('data'))
    return tuple(jax.device_put(x, spec) for x in inputs), batch

  def routed_batch(self, inputs: Sequence[Any], threshold: float = 1.0, offset: float = 0.0,
                   bucket_sizes: Sequence[int] | None = None,
                   timings: dict[str, float] | None = None, *, budget: float | None = None,
                   num_valid: int | None = None, with_pred: bool = False,
                   on_host: bool = False) -> tuple:
    """A batch (`inputs` leading axis B) routed from one prefix: one `choose` call (prefix,
    predictor, exits, guide; sharded over the local devices); only the B int32 exits come
    to the host (with `budget`: the predictions, for `routing.budget_exits` under a mean of
    `budget` GMACs per input, instead of the threshold rule); then per chunk of
    `routing.bucket_plan` one `from_prefix` call gathering its rows of the prefix and
    continuing its route (the prefix is never recomputed); the images are put back in order
    once (`routing.assemble`). Nothing is blocked on unless `timings` is given (then it adds
    the seconds of 'predict' = the choose call, and 'routes'). `num_valid`: only the first
    rows are real (the rest pad a fixed chunk shape: not routed, not returned). `on_host`:
    the images are put in order on the host when read (`np.asarray(images)`: the chunks come
    over as they are and one numpy gather orders them), not on the device: the device
    assembly compiles once per combination of chunk sizes, which a stream of batches with
    varying exits keeps meeting (~0.2 s each on our CPU).
    Returns (images (B, H, W, 3) on device, exits (B,) numpy[, pred (B, E) numpy])."""
    params = self.batch_params
    sizes = tuple(bucket_sizes or self.config.routing.bucket_sizes)
    x, batch = self.put(inputs)
    nv = batch if num_valid is None else int(num_valid)
    c32 = jnp.asarray(self.costs, jnp.float32)
    t0 = time.perf_counter()
    exits_d, pred_d, pre, g = self.choose(params, x, jnp.float32(threshold), c32,
                                          jnp.float32(offset))
    if budget is None:
      exits = np.asarray(exits_d)[:nv]
    else:
      exits = np.asarray(routing.budget_exits(np.asarray(pred_d)[:nv], self.costs, budget),
                         np.int32)
    t1 = time.perf_counter()
    chunks, positions = routing.bucket_plan(exits, len(self.costs), sizes)
    outs = []
    for r, rows in chunks:
      outs.append(self.from_prefix[r](params, pre, g, rows))
      if timings is not None:
        block(outs[-1])
    t2 = time.perf_counter()
    images = _HostImages(outs, positions) if on_host else _assemble(tuple(outs), positions)
    if timings is not None:
      block(images)
      timings['predict'] = timings.get('predict', 0.0) + (t1 - t0)
      timings['routes'] = timings.get('routes', 0.0) + (time.perf_counter() - t1)
      del t2
    if with_pred:
      return images, exits, np.asarray(pred_d)[:nv]
    return images, exits


_assemble = jax.jit(routing.assemble)


class _HostImages:
  """A batch's chunk outputs, put in order on the host by `np.asarray(...)` (one gather)."""

  def __init__(self, outs: Sequence[Any], positions: np.ndarray):
    self.outs, self.positions = outs, positions

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    a = np.concatenate([np.asarray(o) for o in self.outs])[self.positions]
    return a if dtype is None else a.astype(dtype)


# ---------------------------------------------------------------------------------------------
# Loading, one input.


def load(backbone: Backbone, workdir: str,
         stage_names: Sequence[str] = stages.STAGES, **bank_select: Any) -> pl.Pipeline:
  """The trained pipeline; a missing workdir or stage ends in one error naming the command to
  run. `bank_select` picks part of the bank (heads: identities=[...])."""
  inputs_lib.check_workdir(workdir)
  return stages.load_pipeline(backbone, workdir, stages=tuple(stage_names), **bank_select)


def route_one(engine: Engine, inputs: Sequence[Any], threshold: float, *, offset: float = 0.0,
              verify: bool = False, repeats: int = 5) -> tuple[np.ndarray, dict[str, Any]]:
  """Route one input (`inputs` = route inputs with batch 1); returns (image (H, W, 3) in
  [-1, 1], info: exit (block index or 'backbone'), route index, predicted LPIPS of every exit
  and of the chosen one, GMACs (and share of the backbone), first_call_s (the first routed
  call: compile, or load from the compilation cache, + one run), latency (median of `repeats`
  after it), and with `verify` the true LPIPS of the chosen route against the backbone
  image)."""
  t = inputs_lib.check_threshold(threshold)
  params, costs = engine.params, engine.costs
  inputs = tuple(jnp.asarray(x) for x in inputs)
  c32 = jnp.asarray(costs, jnp.float32)

  def run():
    return engine.routed_one(params, inputs, jnp.float32(t), c32, jnp.float32(offset))
  t0 = time.perf_counter()
  image, aux = block(run())
  first_call = time.perf_counter() - t0
  latency = time_fn(run, repeats, warmup=0)
  route = int(aux['exit'])
  pred = np.asarray(aux['pred_lpips'], np.float64)
  exits = list(engine.exits)
  info: dict[str, Any] = {
      'threshold': t, 'offset': float(offset), 'route': route,
      'exit': int(exits[route]) if route < len(exits) else 'backbone',
      'pred_lpips': {f'exit{k}': float(v) for k, v in zip(exits, pred)},
      'pred_lpips_chosen': float(pred[route]) if route < len(exits) else 0.0,
      'gmacs': float(costs[route]), 'gmacs_share': float(costs[route] / costs[-1]),
      'first_call_s': first_call, 'latency_ms': 1e3 * latency, 'device': device_name()}
  if verify:
    from fiancee_jax.metrics import lpips as lpips_lib  # noqa: PLC0415 (VGG weights: verify only)
    imgs, _ = engine.all(params, *inputs)
    ref, lp = imgs[-1], lpips_lib.load()
    info['true_lpips'] = 0.0 if route == len(exits) else float(lp(jnp.asarray(image), ref)[0])
    info['true_lpips_all'] = {f'exit{k}': float(lp(imgs[e], ref)[0])
                              for e, k in enumerate(exits)}
  return np.asarray(image[0]), info


def write_image(out: str, image: np.ndarray) -> None:
  from fiancee_jax.train import logging as tlog  # noqa: PLC0415
  tlog.write_png(out, tlog.to_uint8(image))


def infer_file(backbone: Backbone, workdir: str, *, threshold: Any = TARGET_LPIPS,
               rule: rules.Rule | None = None, verify: bool = False, out: str | None = None,
               repeats: int = 5, engine: Engine | None = None, started: float | None = None,
               warm: bool = True, **flags: Any) -> dict[str, Any]:
  """`infer.py` for one input -> writes the image (default `<workdir>/infer/<name>_t<t>.png`)
  and returns the info dict (with `image` = the written path). `rule`: the routing rule
  (`infer.rules.check`; default the calibrated rule at config.routing.alpha); its name,
  offset (and alpha, delta, calibration rows) go in the info. `flags`: infer.py's input
  flags (label, index, split, noise_seed / source, driver, source_index, driver_index,
  identity), read by the adapter's `infer_inputs().from_flags` before any stage is loaded.
  `started`: the process's start (`time.time()` clock; infer.py passes it) for
  'time_to_first_image_s'; the info's 'startup' splits that time into its parts (seconds)."""
  t_call = time.time()
  t = inputs_lib.check_threshold(threshold)
  rule = rule or rules.check(default_alpha=float(backbone.config.routing.alpha))
  req = backbone.infer_inputs().from_flags(workdir, flags)
  t0 = time.perf_counter()
  if engine is None:
    engine = Engine(load(backbone, workdir, **req.bank_select))
  load_s = time.perf_counter() - t0
  # batch 1 compiled at load, not at the first call
  warm_s = engine.warm(like=req.inputs) if warm else 0.0
  rule = rules.calibrate(rule, backbone, workdir, engine.pipeline)
  rule_info = rule.info(t, engine.costs)
  t_route = time.time()
  image, info = route_one(engine, req.inputs, t, offset=rule_info['offset'], verify=verify,
                          repeats=repeats)
  first_image = t_route + info['first_call_s']
  startup = {'imports_and_init_s': None if started is None else t_call - started,
             'load_s': load_s, 'warm_s': warm_s, 'calibration_s': rule.load_s,
             'first_call_s': info.pop('first_call_s')}
  if started is not None:
    info['time_to_first_image_s'] = first_image - started
  info['startup'] = startup
  out = out or os.path.join(wd.infer_dir(workdir), f'{req.name}_t{t:g}.png')
  write_image(out, image)
  info.update(rule_info, image=out, **req.info)
  return info

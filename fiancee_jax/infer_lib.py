"""Inference with early exits: one input (`infer_one`) and the threshold sweep (`sweep`).

One input (Sec. 3.2): label map + noise -> backbone prefix -> predictor -> the cheapest exit
whose predicted LPIPS (+ the conformal offset, when asked) is <= the threshold -> that route,
all in one jitted function (`routing.routed_apply`, `lax.switch` runs only the chosen route).

Sweep (Sec. 4.1, Figs. 3, 4, 8, 9): over the predictor's test split and a range of
thresholds: exit distribution, mean GMACs, realised LPIPS and violation rate (paper rule and
conformal offset calibrated on the calibration split), the GFLOPs/LPIPS gain (Sec. 3.4), and
wall-clock latency of every route and of routed batched inference vs the backbone, measured in
the same run. `report.write` turns the result into `<workdir>/report/`.

The route functions of `fiancee.route_fns` take (params, seg, z) and recompute the backbone
prefix (first conv + ResBlock 1, the predictor's input); routed inference therefore runs the
prefix once for the predictor and once more inside each route. The measured cost of that is
reported (`overhead.prefix_ms`).
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fiancee_jax import routing
from fiancee_jax.train import predictor as tp

PyTree = Any
TARGET_LPIPS = 0.1   # the headline quality (issue: mean LPIPS <= 0.1)


class InferError(ValueError):
  """Bad user input to inference: one clear message."""


# ---------------------------------------------------------------------------------------------
# Inputs.


def check_threshold(threshold: Any) -> float:
  """A finite LPIPS threshold > 0, else InferError."""
  try:
    t = float(threshold)
  except (TypeError, ValueError):
    raise InferError(f'--threshold={threshold!r}: expected a number (an LPIPS value > 0)') from None
  if not math.isfinite(t) or t <= 0:
    raise InferError(f'--threshold={threshold!r}: expected a finite LPIPS value > 0 '
                     '(e.g. 0.1)')
  return t


def read_label(path: str, config: ml_collections.ConfigDict) -> np.ndarray:
  """A label-id PNG (single channel, values = class ids) -> (H, W) int32, checked against
  the config's resolution and number of classes."""
  from PIL import Image  # noqa: PLC0415
  d = config.data
  if not os.path.isfile(path):
    raise InferError(f'--label={path!r}: no such file (expected a label-id PNG)')
  try:
    with Image.open(path) as im:
      mode = im.mode
      arr = np.asarray(im)
  except Exception as e:  # noqa: BLE001 - unreadable image: one message
    raise InferError(f'--label={path!r}: cannot read it as an image ({e})') from None
  if arr.ndim == 3:
    if arr.shape[2] in (3, 4) and np.all(arr[..., :3] == arr[..., :1]):
      arr = arr[..., 0]
    else:
      raise InferError(f'--label={path!r}: a {mode} colour image; expected a single-channel PNG '
                       f'of class ids in [0, {d.num_classes}) (e.g. Cityscapes *_labelIds.png)')
  if arr.shape != (d.height, d.width):
    raise InferError(f'--label={path!r}: size {arr.shape[0]}x{arr.shape[1]} (HxW); the model '
                     f'expects {d.height}x{d.width}')
  bad = np.unique(arr[(arr < 0) | (arr >= d.num_classes)])
  if bad.size:
    raise InferError(f'--label={path!r}: unknown class ids {bad[:10].tolist()}; expected ids in '
                     f'[0, {d.num_classes})')
  return arr.astype(np.int32)


def dataset_label(config: ml_collections.ConfigDict, workdir: str, split: str,
                  index: int) -> np.ndarray:
  """Label map `index` of a prepared data split, (H, W) int32."""
  from fiancee_jax import data  # noqa: PLC0415
  src = data.source(config.data, split, tp.data_dir(config, workdir))
  if not 0 <= index < len(src):
    raise InferError(f'--index={index}: the {split!r} split has {len(src)} examples')
  return np.asarray(src[index]['label'], np.int32)


def noise(config: ml_collections.ConfigDict, seed: int) -> np.ndarray:
  """z (z_dim,) drawn from `seed` (the same seed gives the same image)."""
  return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (config.model.z_dim,)),
                    np.float32)


def load(config: ml_collections.ConfigDict, workdir: str,
         stages: Sequence[str] = ('backbone', 'bank', 'branches', 'predictor')) -> Any:
  """The trained pipeline; a missing stage ends in one error naming the command to run."""
  from fiancee_jax import fiancee  # noqa: PLC0415
  if not os.path.isdir(workdir):
    raise InferError(f'--workdir={workdir!r} does not exist: run the stages first '
                     '(train.py --stage=backbone, build_bank.py, train.py --stage=branches, '
                     'train.py --stage=predictor)')
  return fiancee.load_pipeline(config, workdir, stages=tuple(stages))


# ---------------------------------------------------------------------------------------------
# Jitted pieces (built once per pipeline; params stay jit arguments).


def _predictor_of(pipeline: Any) -> Callable:
  # params['predictor'] holds the predictor's variables ({'params': ...}, fiancee.py).
  return lambda params, feats: pipeline.predictor.apply(params['predictor'], feats['block1'])


_JIT_CACHE: dict[int, tuple[Any, dict]] = {}


def _jitted(pipeline: Any) -> dict[str, Callable]:
  """Jitted functions of a pipeline, built once per pipeline object (kept by id)."""
  hit = _JIT_CACHE.get(id(pipeline))
  if hit is not None and hit[0] is pipeline:
    return hit[1]
  from fiancee_jax import fiancee  # noqa: PLC0415
  n_cls = pipeline.config.data.num_classes
  routes = fiancee.route_fns(pipeline)
  predict = _predictor_of(pipeline)

  def onehot(labels):
    return jax.nn.one_hot(labels, n_cls, dtype=jnp.float32)

  def predict_fn(params, labels, z):
    _, feats = fiancee.prefix(pipeline, params, onehot(labels), z)
    return predict(params, feats)

  def prefix_fn(params, labels, z):
    return fiancee.prefix(pipeline, params, onehot(labels), z)[1]['block1']

  def guide_fn(params, labels, z):
    seg = onehot(labels)
    return fiancee.guide(pipeline, params, fiancee.prefix(pipeline, params, seg, z)[1], seg)

  def routed_one(params, labels, z, threshold, costs, offset):
    def pre(p, x):
      _, feats = fiancee.prefix(pipeline, p, onehot(x[0]), x[1])
      return x, feats

    exit_fns = tuple((lambda p, f, r=r: r(p, onehot(f[0][0]), f[0][1])) for r in routes)
    return routing.routed_apply(pre, lambda p, f: predict(p, f[1])[0], exit_fns, params,
                                (labels, z), threshold, costs, offset)

  def all_fn(params, labels, z):  # a list in route order (int and str dict keys do not sort)
    imgs = fiancee.all_images(pipeline, params, onehot(labels), z)
    return [imgs[k] for k in pipeline.exits] + [imgs['backbone']]

  fns = {
      'predict': jax.jit(predict_fn), 'prefix': jax.jit(prefix_fn), 'guide': jax.jit(guide_fn),
      'routed_one': jax.jit(routed_one), 'all': jax.jit(all_fn),
      'routes': [jax.jit(lambda params, labels, z, r=r: r(params, onehot(labels), z))
                 for r in routes]}
  _JIT_CACHE.clear()  # one pipeline at a time: do not hold old params alive
  _JIT_CACHE[id(pipeline)] = (pipeline, fns)
  return fns


def _block(x: Any) -> Any:
  return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, 'block_until_ready')
                                else a, x)


def time_fn(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
  """Median wall-clock seconds of fn() (outputs blocked on), after `warmup` calls."""
  for _ in range(warmup):
    _block(fn())
  times = []
  for _ in range(max(repeats, 1)):
    t0 = time.perf_counter()
    _block(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def device_name() -> str:
  d = jax.devices()[0]
  kind = getattr(d, 'device_kind', d.platform)
  return f'{d.platform}:{kind} ({platform.processor() or platform.machine()}, ' \
         f'{os.cpu_count()} cpus)' if d.platform == 'cpu' else f'{d.platform}:{kind}'


# ---------------------------------------------------------------------------------------------
# One input.


def infer_one(pipeline: Any, labels: np.ndarray, z: np.ndarray, threshold: float, *,
              offset: float = 0.0, verify: bool = False, repeats: int = 5
              ) -> tuple[np.ndarray, dict[str, Any]]:
  """Route one input (labels (H, W) ids, z (z_dim,)); returns (image (H, W, 3) in [-1, 1],
  info: exit (block index or 'backbone'), route index, predicted LPIPS of every exit and of the
  chosen one, GMACs (and share of the backbone), latency (median of `repeats` after warm-up),
  and with `verify` the true LPIPS of the chosen route against the backbone image)."""
  t = check_threshold(threshold)
  fns = _jitted(pipeline)
  params = pipeline.params
  costs = jnp.asarray(pipeline.costs, jnp.float32)
  lab, zz = jnp.asarray(labels[None], jnp.int32), jnp.asarray(z[None], jnp.float32)
  run = lambda: fns['routed_one'](params, lab, zz, jnp.float32(t), costs, jnp.float32(offset))
  latency = time_fn(run, repeats)
  image, aux = run()
  route = int(aux['exit'])
  pred = np.asarray(aux['pred_lpips'], np.float64)
  exits = list(pipeline.exits)
  info: dict[str, Any] = {
      'threshold': t, 'offset': float(offset), 'route': route,
      'exit': int(exits[route]) if route < len(exits) else 'backbone',
      'pred_lpips': {f'exit{k}': float(v) for k, v in zip(exits, pred)},
      'pred_lpips_chosen': float(pred[route]) if route < len(exits) else 0.0,
      'gmacs': float(pipeline.costs[route]),
      'gmacs_share': float(pipeline.costs[route] / pipeline.costs[-1]),
      'latency_ms': 1e3 * latency, 'device': device_name()}
  if verify:
    from fiancee_jax.metrics import lpips as lpips_lib  # noqa: PLC0415
    imgs = fns['all'](params, lab, zz)
    ref, lp = imgs[-1], lpips_lib.load()
    info['true_lpips'] = 0.0 if route == len(exits) else float(lp(jnp.asarray(image), ref)[0])
    info['true_lpips_all'] = {f'exit{k}': float(lp(imgs[e], ref)[0])
                              for e, k in enumerate(exits)}
  return np.asarray(image[0]), info


def infer_file(config: ml_collections.ConfigDict, workdir: str, *, label: str | None = None,
               index: int | None = None, split: str = 'test', noise_seed: int = 0,
               threshold: float = TARGET_LPIPS, offset: float = 0.0, verify: bool = False,
               out: str | None = None, repeats: int = 5, pipeline: Any = None) -> dict[str, Any]:
  """`infer.py` for one input: a label PNG (or a data split index) + a noise seed -> writes
  the image (default `<workdir>/infer/<name>_t<threshold>.png`) and returns the info dict
  (with `image` = the written path). Inputs are checked before any stage is loaded."""
  from fiancee_jax.train import logging as tlog  # noqa: PLC0415
  t = check_threshold(threshold)
  if (label is None) == (index is None):
    raise InferError('give exactly one of --label (a label-id PNG) or --index (a data split '
                     'index)')
  if label is not None:
    labels = read_label(label, config)
    name = os.path.splitext(os.path.basename(label))[0]
  else:
    labels = dataset_label(config, workdir, split, int(index))
    name = f'{split}{int(index)}'
  pipeline = pipeline or load(config, workdir)
  image, info = infer_one(pipeline, labels, noise(config, noise_seed), t, offset=offset,
                          verify=verify, repeats=repeats)
  out = out or os.path.join(os.path.abspath(workdir), 'infer', f'{name}_s{noise_seed}_t{t:g}.png')
  tlog.write_png(out, tlog.to_uint8(image))
  info.update(image=out, noise_seed=int(noise_seed), input=label or f'{split}[{index}]')
  return info


# ---------------------------------------------------------------------------------------------
# Batched routed inference.


def routed_batch(pipeline: Any, labels: np.ndarray, z: np.ndarray, threshold: float,
                 offset: float = 0.0, bucket_sizes: Sequence[int] | None = None,
                 timings: dict[str, float] | None = None) -> tuple[jax.Array, np.ndarray]:
  """A batch: prefix + predictor once for the batch, exits on the host, then each route on
  its bucket (`routing.run_bucketed`). Returns (images (B, H, W, 3), exits (B,)). With
  `timings`, adds the seconds spent in prediction ('predict') and in route calls ('routes')."""
  fns = _jitted(pipeline)
  params = pipeline.params
  sizes = tuple(bucket_sizes or pipeline.config.routing.bucket_sizes)
  t0 = time.perf_counter()
  pred = np.asarray(fns['predict'](params, labels, z))
  t1 = time.perf_counter()
  exits = np.asarray(routing.choose_exit(pred, threshold, pipeline.costs, offset))
  spent = [0.0]

  def wrap(r):
    def call(x):
      s = time.perf_counter()
      out = _block(r(params, x[0], x[1]))
      spent[0] += time.perf_counter() - s
      return out
    return call

  images = routing.run_bucketed([wrap(r) for r in fns['routes']], exits,
                                (jnp.asarray(labels), jnp.asarray(z)), sizes)
  if timings is not None:
    timings['predict'] = timings.get('predict', 0.0) + (t1 - t0)
    timings['routes'] = timings.get('routes', 0.0) + spent[0]
  return images, exits


# ---------------------------------------------------------------------------------------------
# Sweep.


def _split_labels(config, workdir, rows) -> np.ndarray:
  uniq, inv = np.unique(rows['maps'], return_inverse=True)
  return tp.load_labels(config, workdir, rows['data_split'], uniq)[inv]


def headline_row(rows: list[dict[str, Any]], prefix: str,
                 target: float = TARGET_LPIPS) -> tuple[dict[str, Any], bool]:
  """The row of the largest threshold whose realised mean LPIPS <= target (else the
  smallest threshold, flagged False)."""
  ok = [r for r in rows if r[prefix + 'mean_true_lpips'] <= target]
  if ok:
    return max(ok, key=lambda r: r['threshold']), True
  return min(rows, key=lambda r: r['threshold']), False


def gain_slope(rows: list[dict[str, Any]], prefix: str) -> float:
  """GFLOPs/LPIPS gain (Sec. 3.4): minus the least-squares slope of mean GMACs against
  realised mean LPIPS over the sweep (the paper fits a constant slope to its Fig. 3 curve)."""
  x = np.array([r[prefix + 'mean_true_lpips'] for r in rows])
  y = np.array([r[prefix + 'mean_gmacs'] for r in rows])
  if len(x) < 2 or np.ptp(x) <= 0:
    return math.nan
  return float(-np.polyfit(x, y, 1)[0])


def sweep(config: ml_collections.ConfigDict, workdir: str, *,
          thresholds: Sequence[float] | None = None, out_dir: str | None = None,
          repeats: int = 3, batch_size: int | None = None, nobank_workdir: str | None = None,
          num_samples: int = 4, pipeline: Any = None) -> dict[str, Any]:
  """Run the sweep on the predictor's test split and write the report; returns the summary
  (also `<out_dir>/summary.json`, default `<workdir>/report`)."""
  from fiancee_jax import report  # noqa: PLC0415
  thresholds = tuple(config.routing.thresholds if thresholds is None else thresholds)
  if not thresholds:
    raise InferError('--thresholds is empty: expected at least one LPIPS value')
  thresholds = tuple(sorted(check_threshold(t) for t in thresholds))
  pipeline = pipeline or load(config, workdir)
  out_dir = out_dir or os.path.join(os.path.abspath(workdir), 'report')
  alpha = float(config.routing.alpha)
  costs = np.asarray(pipeline.costs, np.float64)
  exits = [int(k) for k in pipeline.exits]

  print('[sweep] predictor datasets (cached by train.py --stage=predictor)', flush=True)
  test = tp.dataset(config, workdir, 'test', pipeline)
  cal = tp.dataset(config, workdir, 'calibration', pipeline)
  pred = tp.predict(pipeline.predictor, pipeline.params['predictor']['params'], test['feats'])
  pred_cal = tp.predict(pipeline.predictor, pipeline.params['predictor']['params'], cal['feats'])
  true, true_cal = test['targets'], cal['targets']
  rows = routing.sweep_rows(pred, true, costs, thresholds, alpha, pred_cal, true_cal)
  head, met = headline_row(rows, 'calibrated_')
  head_paper, met_paper = headline_row(rows, '')

  # Fig. 9: each exit alone vs the predictor enforcing that exit's mean quality (paper rule).
  fig9 = []
  for e, k in enumerate(exits):
    t_k = float(np.mean(true[:, e]))
    if t_k > 0:
      chosen = np.asarray(routing.choose_exit(pred, t_k, costs))
      fig9.append({'exit': k, 'threshold': t_k, 'single': true[:, e].tolist(),
                   'routed': routing.chosen_lpips(true, chosen).tolist()})

  # Latency: every route, the backbone and routed inference on the same batches, one run.
  labels = _split_labels(config, workdir, test)
  z = test['z']
  n = len(labels)
  bs = int(batch_size or min(n, max(config.routing.bucket_sizes)))
  fns = _jitted(pipeline)
  params = pipeline.params
  batches = [(labels[i:i + bs], z[i:i + bs]) for i in range(0, n - bs + 1, bs)] or \
      [(labels[:bs], z[:bs])]
  print(f'[sweep] latency: {len(batches)} batch(es) of {bs}, median of {repeats} runs, '
        f'threshold {head["threshold"]} (calibrated offset {head["offset"]:.4f})', flush=True)
  route_ms = []
  for r, fn in enumerate(fns['routes']):
    lb, zb = batches[0]
    route_ms.append(1e3 * time_fn(lambda fn=fn: fn(params, lb, zb), repeats) / bs)
  backbone_s = time_fn(lambda: [fns['routes'][-1](params, lb, zb) for lb, zb in batches],
                       repeats)
  offset = head['offset'] if math.isfinite(head['offset']) else (
      math.inf if head['offset'] > 0 else -1e9)
  t_head = head['threshold']
  for lb, zb in batches:  # warm every bucket shape first
    routed_batch(pipeline, lb, zb, t_head, offset)
  routed_times, parts = [], []
  for _ in range(max(repeats, 1)):
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    for lb, zb in batches:
      routed_batch(pipeline, lb, zb, t_head, offset, timings=timings)
    routed_times.append(time.perf_counter() - t0)
    parts.append(timings)
  routed_s = statistics.median(routed_times)
  mid = parts[int(np.argsort(routed_times)[len(routed_times) // 2])]
  one_l, one_z = labels[:1], z[:1]
  cheapest = int(np.argmin(costs))
  t_cheap1 = time_fn(lambda: fns['routes'][cheapest](params, one_l, one_z), max(repeats, 5))
  t_pred1 = time_fn(lambda: fns['predict'](params, one_l, one_z), max(repeats, 5))
  t_guide1 = time_fn(lambda: fns['guide'](params, one_l, one_z), max(repeats, 5))
  t_prefix1 = time_fn(lambda: fns['prefix'](params, one_l, one_z), max(repeats, 5))
  n_run = bs * len(batches)
  latency = {
      'batch_size': bs, 'num_images': n_run, 'repeats': repeats,
      'per_route_ms_per_image': route_ms,
      'backbone_ms_per_image': 1e3 * backbone_s / n_run,
      'routed_ms_per_image': 1e3 * routed_s / n_run,
      'speedup': backbone_s / routed_s,
      'routed_parts_ms_per_image': {
          'prefix_and_predictor': 1e3 * mid.get('predict', 0.0) / n_run,
          'routes': 1e3 * mid.get('routes', 0.0) / n_run,
          'host_dispatch': 1e3 * max(routed_s - mid.get('predict', 0.0) - mid.get('routes', 0.0),
                                     0.0) / n_run},
      'overhead_batch1': {
          'cheapest_route': f'exit{exits[cheapest]}' if cheapest < len(exits) else 'backbone',
          'cheapest_route_ms': 1e3 * t_cheap1,
          'prefix_and_predictor_ms': 1e3 * t_pred1,
          'prefix_ms': 1e3 * t_prefix1,
          'prefix_and_retrieval_ms': 1e3 * t_guide1,
          'predictor_share_of_cheapest': t_pred1 / t_cheap1,
          'retrieval_share_of_cheapest': max(t_guide1 - t_prefix1, 0.0) / t_cheap1},
  }
  print(f'[sweep] backbone {latency["backbone_ms_per_image"]:.2f} ms/img, routed '
        f'{latency["routed_ms_per_image"]:.2f} ms/img -> x{latency["speedup"]:.2f}', flush=True)

  # Sample grid: label | exits | backbone | routed (the exit it took).
  k = min(num_samples, n)
  imgs = fns['all'](params, labels[:k], z[:k])
  s_exits = np.asarray(routing.choose_exit(pred[:k], t_head, costs, offset))
  stack = [np.asarray(x) for x in imgs]
  routed_imgs = np.stack([stack[s_exits[i]][i] for i in range(k)])

  true_nobank = None
  if nobank_workdir:
    path = os.path.join(tp.stage_dir(nobank_workdir), 'dataset_test.npz')
    if not os.path.exists(path):
      raise InferError(f'--nobank_workdir={nobank_workdir!r}: no {path}; run its stages with '
                       'branches.use_bank=False first')
    with np.load(path) as f:
      true_nobank = f['targets']

  eval_path = os.path.join(tp.stage_dir(workdir), 'eval.json')
  pred_eval = json.load(open(eval_path)) if os.path.exists(eval_path) else None
  gm = costs[-1]
  summary = {
      'threshold': head['threshold'],
      'rule': f'conformal offset (alpha={alpha}) calibrated on {len(true_cal)} held-out inputs',
      'meets_target': met, 'target_mean_lpips': TARGET_LPIPS,
      'mean_lpips': head['calibrated_mean_true_lpips'],
      'violation_rate': head['calibrated_violation_rate'],
      'gmacs_share': head['calibrated_mean_gmacs'] / gm,
      'mean_gmacs': head['calibrated_mean_gmacs'], 'backbone_gmacs': float(gm),
      'exit_counts': head['calibrated_exit_counts'],
      'offset': head['offset'],
      'latency_speedup': latency['speedup'],
      'gain_gmacs_per_lpips': gain_slope(rows, 'calibrated_'),
      'routing_overhead_share_of_cheapest': (
          latency['overhead_batch1']['prefix_and_predictor_ms'] +
          max(latency['overhead_batch1']['prefix_and_retrieval_ms'] -
              latency['overhead_batch1']['prefix_ms'], 0.0)) /
      latency['overhead_batch1']['cheapest_route_ms'],
      'paper_rule': {'threshold': head_paper['threshold'], 'meets_target': met_paper,
                     'mean_lpips': head_paper['mean_true_lpips'],
                     'violation_rate': head_paper['violation_rate'],
                     'gmacs_share': head_paper['mean_gmacs'] / gm,
                     'gain_gmacs_per_lpips': gain_slope(rows, '')},
      'num_test': int(len(true)), 'device': device_name(), 'config': config.name,
      'workdir': os.path.abspath(workdir),
  }
  result = {
      'summary': summary, 'rows': rows, 'exits': exits, 'costs': costs.tolist(),
      'alpha': alpha, 'true': true, 'pred': pred, 'true_nobank': true_nobank, 'fig9': fig9,
      'latency': latency, 'predictor_eval': pred_eval,
      'samples': {'labels': labels[:k], 'exits': [np.asarray(x[:k]) for x in stack],
                  'routed': routed_imgs, 'routed_exit': s_exits.tolist()},
  }
  paths = report.write(out_dir, result)
  summary['report'] = paths['report']
  return summary

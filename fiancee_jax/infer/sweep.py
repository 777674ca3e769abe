"""The threshold sweep (`infer.py --sweep`, Sec. 4.1 / 4.2; OASIS Figs. 3, 4, 8, 9, head
avatars Figs. 5, 6, 7, 10) over the predictor's test split and a range of thresholds.

Per threshold: exit distribution, mean GMACs, realised LPIPS and violation rate (paper rule
and the `infer.rules` rule, by default the conformal offset, calibrated on the cached
calibration split), the GFLOPs/LPIPS gain (Sec. 3.4);
at the headline threshold: wall-clock latency of every route and of routed batched inference
vs the backbone, measured in the same run (`measure_latency`), a sample grid, and what only
one backbone's report has (the adapter's `infer_inputs().sweep_extras`: head avatars'
Fig. 10 rotation data). `infer.report.write` turns the result into `<workdir>/report/`.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from fiancee_jax import workdir as wd
from fiancee_jax.core import predictor_data, routing, stages
from fiancee_jax.core.interface import Backbone
from fiancee_jax.infer import inputs as inputs_lib
from fiancee_jax.infer import report, rules
from fiancee_jax.infer.engine import Engine, device_name, load, routing_cost, time_fn
from fiancee_jax.infer.inputs import TARGET_LPIPS, InferError
from fiancee_jax.metrics import lpips as lpips_lib
from fiancee_jax.train import predictor as tp


class _Phases:
  """Console lines with the seconds each phase of the sweep took."""

  def __init__(self):
    self.t = time.perf_counter()

  def done(self, what: str) -> None:
    now = time.perf_counter()
    print(f'[sweep] {what}: {now - self.t:.0f} s', flush=True)
    self.t = now


def _label(rule: rules.Rule) -> str:
  """The rule's legend entry in the figures."""
  if rule.name == 'calibrated':
    return f'conformal, alpha={rule.alpha:g}'
  if rule.name == 'ltt':
    return f'LTT, alpha={rule.alpha:g}, delta={rule.delta:g}'
  return rule.describe()


def measure_latency(engine: Engine, inputs: Sequence[np.ndarray], batch_size: int,
                    repeats: int, threshold: float, offset: float) -> dict[str, Any]:
  """Wall-clock of every route, the backbone and routed batched inference
  (`Engine.routed_batch`) on the same batches in one run, + at batch 1 the parts (prefix,
  predictor, retrieval) against the cheapest route and what routing adds to it
  (`engine.routing_cost`)."""
  params, costs = engine.params, engine.costs
  n, bs = len(inputs[0]), int(batch_size)
  batches = [tuple(x[i:i + bs] for x in inputs) for i in range(0, n - bs + 1, bs)] or \
      [tuple(x[:bs] for x in inputs)]
  print(f'[sweep] latency: {len(batches)} batch(es) of {bs}, median of {repeats} runs, '
        f'threshold {threshold} (calibrated offset {offset:.4f})', flush=True)
  route_ms = [1e3 * time_fn(lambda fn=fn: fn(params, *batches[0]), repeats) / bs
              for fn in engine.routes]
  backbone_s = time_fn(lambda: [engine.routes[-1](params, *b) for b in batches], repeats)
  for b in batches:  # warm every bucket shape first
    engine.routed_batch(b, threshold, offset)
  routed_times, parts = [], []
  for _ in range(max(repeats, 1)):
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    for b in batches:
      engine.routed_batch(b, threshold, offset, timings=timings)
    routed_times.append(time.perf_counter() - t0)
    parts.append(timings)
  routed_s = statistics.median(routed_times)
  mid = parts[int(np.argsort(routed_times)[len(routed_times) // 2])]
  one = tuple(x[:1] for x in inputs)
  cheapest = int(np.argmin(costs))
  t1 = {name: time_fn(lambda fn=fn: fn(params, *one), max(repeats, 5)) for name, fn in
        (('cheap', engine.routes[cheapest]), ('pred', engine.predict), ('guide', engine.guide),
         ('prefix', engine.prefix))}
  cost = routing_cost(engine, tuple(jnp.asarray(a) for a in one), max(repeats, 20))
  n_run = bs * len(batches)
  lat = {
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
          'cheapest_route': engine.route_name(cheapest),
          'cheapest_route_ms': 1e3 * t1['cheap'],
          'prefix_and_predictor_ms': 1e3 * t1['pred'],
          'prefix_ms': 1e3 * t1['prefix'],
          'prefix_and_retrieval_ms': 1e3 * t1['guide'],
          'predictor_share_of_cheapest': t1['pred'] / t1['cheap'],
          'retrieval_share_of_cheapest': max(t1['guide'] - t1['prefix'], 0.0) / t1['cheap']},
      'routing_cost_batch1': cost,
  }
  print(f'[sweep] backbone {lat["backbone_ms_per_image"]:.2f} ms/img, routed '
        f'{lat["routed_ms_per_image"]:.2f} ms/img -> x{lat["speedup"]:.2f}', flush=True)
  return lat


def sample_grid(engine: Engine, backbone_inputs: inputs_lib.BackboneInputs,
                inputs: Sequence[np.ndarray], exits_taken: np.ndarray) -> dict[str, Any]:
  """Images of the sample grid for the first k = len(exits_taken) inputs: every route
  ('exits', route order, each (k, H, W, 3)), the routed image, and the adapter's input
  columns (`BackboneInputs.sample_columns`: OASIS 'labels'; head avatars 'inputs' = source,
  driver and the guiding bank frame, as in Fig. 5)."""
  k = len(exits_taken)
  x = tuple(jnp.asarray(a[:k]) for a in inputs)
  images, aux = engine.all(engine.params, *x)
  stack = [np.asarray(a) for a in images]
  out = {'exits': stack, 'routed': np.stack([stack[e][i] for i, e in enumerate(exits_taken)]),
         'routed_exit': np.asarray(exits_taken).tolist()}
  return out | backbone_inputs.sample_columns(inputs, k, aux['guide'])


def headline_row(rows: list[dict[str, Any]], prefix: str,
                 target: float = TARGET_LPIPS) -> tuple[dict[str, Any], bool]:
  """The row of the largest threshold whose realised mean LPIPS <= target (else the
  smallest threshold, flagged False)."""
  ok = [r for r in rows if r[prefix + 'mean_true_lpips'] <= target]
  if ok:
    return max(ok, key=lambda r: r['threshold']), True
  return min(rows, key=lambda r: r['threshold']), False


def headlines(rows: list[dict[str, Any]], target: float = TARGET_LPIPS):
  """((calibrated row, met), (paper-rule row, met), (best row, met), at_target). The
  headline is the paper's operating point, threshold == target, both rules on that row, when
  it was swept (at_target True); beside it, the largest threshold whose calibrated realised
  mean LPIPS <= target (`headline_row`). Without that threshold both headlines are
  `headline_row`'s, each rule its own."""
  best = headline_row(rows, 'calibrated_', target)
  at = [r for r in rows if abs(r['threshold'] - target) < 1e-9]
  if not at:
    return best, headline_row(rows, '', target), best, False
  r = at[0]
  return ((r, r['calibrated_mean_true_lpips'] <= target), (r, r['mean_true_lpips'] <= target),
          best, True)


def gain_slope(rows: list[dict[str, Any]], prefix: str) -> float:
  """GFLOPs/LPIPS gain (Sec. 3.4): minus the least-squares slope of mean GMACs against
  realised mean LPIPS over the sweep (the paper fits a constant slope to its Fig. 3 curve)."""
  x = np.array([r[prefix + 'mean_true_lpips'] for r in rows])
  y = np.array([r[prefix + 'mean_gmacs'] for r in rows])
  if len(x) < 2 or np.ptp(x) <= 0:
    return math.nan
  return float(-np.polyfit(x, y, 1)[0])


def unguided_lpips(backbone: Backbone, workdir: str, inputs: Sequence[np.ndarray],
                   batch_size: int) -> np.ndarray | None:
  """Fig. 8's unguided curves: LPIPS vs the backbone of every exit of the no-bank ablation
  (`train.py --stage=branches --config.branches.use_bank=False` in the same workdir, into
  checkpoints/branches_nobank) on the sweep's own inputs, (N, E); None when it was not
  trained (or the config itself is unguided)."""
  nobank = wd.checkpoint_dir(workdir, wd.branches_stage(False))
  if not backbone.config.branches.use_bank or not os.path.isdir(nobank) or \
      not os.listdir(nobank):
    return None
  print(f'[sweep] Fig. 8: the unguided branches of {nobank} on the same inputs', flush=True)
  pipeline = stages.load_pipeline(backbone, workdir, stages=('backbone', 'branches'),
                                  use_bank=False)
  n = len(inputs[0])
  bs = -(-n // -(-n // batch_size))  # equal batches: 200 rows as 4 x 50, not 4 x 64 padded
  rows = predictor_data.Targets(pipeline).compute(  # the sweep's inputs are route inputs
      pipeline.params, lpips_lib.load_params(), inputs, bs, name='test, no bank')
  return rows['targets']


def sweep(backbone: Backbone, workdir: str, *, thresholds: Sequence[float] | None = None,
          out_dir: str | None = None, repeats: int = 3, batch_size: int | None = None,
          num_samples: int = 4, engine: Engine | None = None,
          rule: rules.Rule | None = None, latency_images: int = 128) -> dict[str, Any]:
  """Run the sweep on the predictor's test split and write the report; returns the summary
  (also `<out_dir>/summary.json`, default `<workdir>/report`). `engine`: the compiled
  pipeline of `workdir` (built here when not given). `rule` (`infer.rules.check`; default
  the calibrated rule at config.routing.alpha): the rule of the `calibrated_*` columns and
  of the headline, next to the paper rule; its offsets come from the cached calibration
  rows (a missing cache: one error naming `train.py --stage=predictor`). Wall clock is timed
  on the first `latency_images` test inputs (whole batches of `batch_size`)."""
  config = backbone.config
  thresholds = tuple(config.routing.thresholds if thresholds is None else thresholds)
  if not thresholds:
    raise InferError('--thresholds is empty: expected at least one LPIPS value')
  thresholds = tuple(sorted(inputs_lib.check_threshold(t) for t in thresholds))
  engine = engine or Engine(load(backbone, workdir))
  pipeline = engine.pipeline
  backbone_inputs = backbone.infer_inputs()
  out_dir = out_dir or wd.report_dir(workdir)
  rule = rules.calibrate(rule or rules.check(default_alpha=float(config.routing.alpha)),
                         backbone, workdir, pipeline)
  alpha = rule.alpha
  costs = engine.costs
  exits = list(engine.exits)

  clock = _Phases()
  print('[sweep] predictor datasets (cached by train.py --stage=predictor)', flush=True)
  test = predictor_data.dataset(backbone, workdir, 'test', pipeline)
  p_params = pipeline.params['predictor']['params']
  pred = tp.predict(pipeline.predictor, p_params, test['feats'])
  true = test['targets']
  rows = routing.sweep_rows(pred, true, costs, thresholds, alpha,
                            offset_fn=lambda t: rule.offset(t, costs))
  (head, met), (head_paper, met_paper), (best, best_met), at_target = headlines(rows)

  # Fig. 9: each exit alone vs the predictor enforcing that exit's mean quality (paper rule).
  fig9 = []
  for e, k in enumerate(exits):
    t_k = float(np.mean(true[:, e]))
    if t_k > 0:
      chosen = np.asarray(routing.choose_exit(pred, t_k, costs))
      fig9.append({'exit': k, 'threshold': t_k, 'single': true[:, e].tolist(),
                   'routed': routing.chosen_lpips(true, chosen).tolist()})

  inputs, extra = backbone_inputs.from_rows(workdir, test)
  n = len(true)
  bs = int(batch_size or min(n, max(config.routing.bucket_sizes)))
  offset = head['offset'] if math.isfinite(head['offset']) else (
      math.inf if head['offset'] > 0 else -1e9)
  t_head = head['threshold']
  clock.done('load, rule and test rows')
  timed = tuple(x[:max(int(latency_images), bs)] for x in inputs)
  latency = measure_latency(engine, timed, bs, repeats, t_head, offset)
  clock.done('latency')
  taken = np.asarray(routing.choose_exit(pred, t_head, costs, offset))
  samples = sample_grid(engine, backbone_inputs, inputs, taken[:min(num_samples, n)])
  clock.done('sample grid')

  true_nobank = unguided_lpips(backbone, workdir, inputs, bs)
  if true_nobank is not None:
    clock.done('Fig. 8 without the bank')

  eval_path = os.path.join(wd.predictor_dir(workdir), 'eval.json')
  pred_eval = None
  if os.path.exists(eval_path):
    with open(eval_path) as f:
      pred_eval = json.load(f)
  gm = costs[-1]
  summary = {
      'threshold': head['threshold'],
      'headline': 'operating_point' if at_target else 'best_mean_target',
      'rule': rule.name, 'rule_description': rule.describe(), 'alpha': alpha,
      'delta': rule.delta, 'calibration_rows': rule.num_rows,
      'meets_target': met, 'target_mean_lpips': TARGET_LPIPS,
      'mean_lpips': head['calibrated_mean_true_lpips'],
      'violation_rate': head['calibrated_violation_rate'],
      'gmacs_share': head['calibrated_mean_gmacs'] / gm,
      'mean_gmacs': head['calibrated_mean_gmacs'], 'backbone_gmacs': float(gm),
      'exit_counts': head['calibrated_exit_counts'],
      'offset': head['offset'],
      'latency_speedup': latency['speedup'],
      'gain_gmacs_per_lpips': gain_slope(rows, 'calibrated_'),
      'routing_overhead_share_of_cheapest': latency['routing_cost_batch1']['share_of_cheapest'],
      'paper_rule': {'threshold': head_paper['threshold'], 'meets_target': met_paper,
                     'mean_lpips': head_paper['mean_true_lpips'],
                     'violation_rate': head_paper['violation_rate'],
                     'gmacs_share': head_paper['mean_gmacs'] / gm,
                     'gain_gmacs_per_lpips': gain_slope(rows, '')},
      'best_mean_target': {'threshold': best['threshold'], 'meets_target': best_met,
                           'mean_lpips': best['calibrated_mean_true_lpips'],
                           'violation_rate': best['calibrated_violation_rate'],
                           'gmacs_share': best['calibrated_mean_gmacs'] / gm,
                           'exit_counts': best['calibrated_exit_counts']},
      'num_test': int(n), 'device': device_name(), 'config': config.name,
      'workdir': wd.root(workdir),
  }
  result = {
      'kind': backbone_inputs.report_kind,
      'summary': summary, 'rows': rows, 'exits': exits, 'costs': costs.tolist(),
      'alpha': alpha, 'rule': rule.name, 'rule_label': _label(rule),
      'true': true, 'pred': pred, 'true_nobank': true_nobank, 'fig9': fig9,
      'latency': latency, 'predictor_eval': pred_eval, 'samples': samples,
      **backbone_inputs.sweep_extras(pipeline, test, inputs, extra, taken, t_head),
  }
  paths = report.write(out_dir, result)
  clock.done('report and figures')
  summary['report'] = paths['report']
  return summary


def budget_sweep(backbone: Backbone, workdir: str, budget: float, *,
                 engine: Engine | None = None, repeats: int = 3,
                 out_dir: str | None = None) -> dict[str, Any]:
  """`infer.py --sweep --budget G`: the predictor's test split routed by
  `routing.budget_exits` under a mean of G GMACs per input (instead of a threshold rule):
  realised mean GMACs (<= G), mean true LPIPS, violation rate at TARGET_LPIPS, exit counts,
  and the wall clock of routed batched inference under the budget (`Engine.routed_batch`,
  each batch under G) vs the backbone on the same batches, in one run. Written to
  `<out_dir>/budget.json` (default `<workdir>/report`)."""
  config = backbone.config
  engine = engine or Engine(load(backbone, workdir))
  costs, pipeline = engine.costs, engine.pipeline
  b = float(budget)
  if not math.isfinite(b) or b < float(costs.min()):
    raise InferError(f'--budget={budget!r} GMACs: expected a mean budget per input >= '
                     f'{float(costs.min()):.4g} (the cheapest route; the backbone costs '
                     f'{float(costs[-1]):.4g})')
  test = predictor_data.dataset(backbone, workdir, 'test', pipeline)
  pred = np.asarray(tp.predict(pipeline.predictor, pipeline.params['predictor']['params'],
                               test['feats']))
  true = test['targets']
  exits = routing.budget_exits(pred, costs, b)
  got = routing.chosen_lpips(true, exits)
  inputs, _ = backbone.infer_inputs().from_rows(workdir, test)
  n = len(true)
  bs = int(min(n, max(config.routing.bucket_sizes)))
  batches = [tuple(x[i:i + bs] for x in inputs) for i in range(0, n - bs + 1, bs)]
  backbone_s = time_fn(lambda: [engine.routes[-1](engine.params, *x) for x in batches],
                       repeats)
  routed_s = time_fn(lambda: [engine.routed_batch(x, budget=b)[0] for x in batches], repeats)
  out = {'budget_gmacs': b, 'num_test': int(n), 'mean_gmacs': float(costs[exits].mean()),
         'backbone_gmacs': float(costs[-1]),
         'gmacs_share': float(costs[exits].mean() / costs[-1]),
         'mean_pred_lpips': float(routing.chosen_lpips(pred, exits).mean()),
         'mean_true_lpips': float(got.mean()),
         'violation_rate_at_target': routing.violation_rate(got, TARGET_LPIPS),
         'target_lpips': TARGET_LPIPS,
         'exit_counts': np.bincount(exits, minlength=len(costs)).tolist(),
         'latency': {'batch_size': bs, 'num_images': bs * len(batches),
                     'backbone_ms_per_image': 1e3 * backbone_s / (bs * len(batches)),
                     'routed_ms_per_image': 1e3 * routed_s / (bs * len(batches)),
                     'speedup': backbone_s / routed_s},
         'device': device_name(), 'config': config.name}
  path = os.path.join(out_dir or wd.report_dir(workdir), 'budget.json')
  from fiancee_jax import io_utils  # noqa: PLC0415
  io_utils.atomic_write(path, json.dumps(report.jsonable(out), indent=1))
  out['path'] = path
  return out

"""Routed FIANCEE vs its backbone on the clock, on a trained workdir, side by side in one run.

  python bench/routed_latency.py [--workdir runs/demo] [--config configs/oasis_synthetic.py]
      [--threshold 0.1] [--rule calibrated|ltt|paper] [--batches 1,64] [--repeats 5]

Inputs: the predictor's test split (label maps + noises), cycled with fresh noises up to the
largest batch. At the threshold (default rule: the conformal offset from the cached calibration
rows), per batch size: wall-clock ms per image of routed inference (batch 1:
`Engine.routed_one`, one jitted prefix -> predictor -> lax.switch call; larger batches:
`Engine.routed_batch`, one choice call + per (route, bucket) calls continuing from the prefix)
vs the backbone alone on the same inputs; the speed-up, the ideal one (backbone GMACs / the
routed inputs' mean GMACs) and their ratio. At batch 1 also the routing overhead: prefix +
predictor + exit choice (one jitted call), and the bank retrieval, as shares of the cheapest
route's time (the whole route: prefix, blocks, retrieval, branch), and the figure the 10%
target is about: `routing_cost_share_of_cheapest`, the routed call forced to the cheapest exit
(threshold 1e6) vs that exit's route alone, i.e. what predictor, choice and switch add to the
route (the prefix is shared, not repeated). Routed and plain calls are timed in alternation
(medians). One JSON line per figure,
the machine named (`engine.device_name()`). Without a trained workdir it says so and exits 1.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _missing(workdir: str) -> list[str]:
  from fiancee_jax import workdir as wd  # noqa: PLC0415
  need = [wd.checkpoint_dir(workdir, s) for s in ('backbone', 'predictor')]
  out = [p for p in need if not os.path.isdir(p) or not os.listdir(p)]
  if not any(os.path.isdir(wd.checkpoint_dir(workdir, s)) for s in ('branches',
                                                                    'branches_nobank')):
    out.append(wd.checkpoint_dir(workdir, 'branches'))
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--workdir', default='runs/demo')
  ap.add_argument('--config', default='configs/oasis_synthetic.py')
  ap.add_argument('--threshold', type=float, default=0.1)
  ap.add_argument('--rule', default='calibrated', choices=('calibrated', 'ltt', 'paper'))
  ap.add_argument('--alpha', type=float, default=None)
  ap.add_argument('--batches', default='1,64')
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--inputs_batch1', type=int, default=16,
                  help='distinct inputs timed one at a time at batch 1')
  a = ap.parse_args()
  if not os.path.isdir(a.workdir) or _missing(a.workdir):
    what = _missing(a.workdir) if os.path.isdir(a.workdir) else [a.workdir]
    sys.exit(f'routed_latency: no trained workdir at {a.workdir!r} (missing: '
             f'{", ".join(what)}); train one first: `make demo` (runs/demo) or `python -m '
             'fiancee_jax.demo --config configs/oasis_synthetic.py:tiny --workdir DIR`')

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from fiancee_jax import config as cfg  # noqa: PLC0415
  from fiancee_jax import registry  # noqa: PLC0415
  from fiancee_jax.core import pipeline as pl  # noqa: PLC0415
  from fiancee_jax.core import predictor_data, routing  # noqa: PLC0415
  from fiancee_jax.infer import engine as engine_lib  # noqa: PLC0415
  from fiancee_jax.infer import inputs as inputs_lib  # noqa: PLC0415
  from fiancee_jax.infer import rules  # noqa: PLC0415

  config = cfg.load(a.config)
  bb = registry.get(config)
  eng = engine_lib.Engine(engine_lib.load(bb, a.workdir))
  p, params, costs = eng.pipeline, eng.params, eng.costs
  rule = rules.calibrate(rules.check(a.rule, a.alpha, None, None, float(config.routing.alpha)),
                         bb, a.workdir, p)
  offset = rule.offset(a.threshold, costs)
  off = offset if np.isfinite(offset) else (1e9 if offset > 0 else -1e9)
  batches = [int(b) for b in a.batches.split(',')]
  with contextlib.redirect_stdout(sys.stderr):  # progress lines of a (re)computed split
    test = predictor_data.dataset(bb, a.workdir, 'test', p)
  base, _ = bb.infer_inputs().from_rows(a.workdir, test)
  n_max = max(max(batches), a.inputs_batch1)
  reps = -(-n_max // len(base[0]))
  inputs = [np.concatenate([x] * reps)[:n_max] for x in base]
  if 'z' in test and len(inputs) == 2 and reps > 1:  # OASIS: fresh noises for the repeats
    extra = np.stack([inputs_lib.noise(config, 10_000 + i) for i in range(n_max)])
    inputs[1] = np.where(np.arange(n_max)[:, None] < len(base[0]), inputs[1], extra)
  dev = engine_lib.device_name()
  c32 = jnp.asarray(costs, jnp.float32)
  t32, o32 = jnp.float32(a.threshold), jnp.float32(off)
  common = {'workdir': a.workdir, 'config': config.name, 'threshold': a.threshold,
            'rule': rule.name, 'offset': float(offset), 'backbone_gmacs': float(costs[-1]),
            'device': dev, 'repeats': a.repeats}
  eng.warm(batch=max(b for b in batches if b > 1) if any(b > 1 for b in batches) else None,
           like=[x[:1] for x in inputs])

  def timed(fn):
    return engine_lib.time_fn(fn, a.repeats, warmup=1)

  for b in batches:
    if b == 1:
      routed, backbone, taken = [], [], []
      for i in range(a.inputs_batch1):
        x = tuple(jnp.asarray(v[i:i + 1]) for v in inputs)
        r_i, b_i = engine_lib.paired_times(
            lambda x=x: eng.routed_one(params, x, t32, c32, o32),
            lambda x=x: eng.routes[-1](params, *x), a.repeats)
        routed.append(r_i)
        backbone.append(b_i)
        taken.append(int(eng.routed_one(params, x, t32, c32, o32)[1]['exit']))
      r_s, b_s = float(np.mean(routed)), float(np.mean(backbone))
      exits = np.asarray(taken)
    else:
      x = tuple(jnp.asarray(v[:b]) for v in inputs)
      r_s, b_s = engine_lib.paired_times(
          lambda x=x: eng.routed_batch(x, a.threshold, off)[0],
          lambda x=x: eng.routes[-1](params, *x), a.repeats)
      r_s, b_s = r_s / b, b_s / b
      exits = eng.routed_batch(x, a.threshold, off)[1]
      parts = {}
      for _ in range(a.repeats):
        eng.routed_batch(x, a.threshold, off, timings=parts)
    ideal = float(costs[-1] / costs[exits].mean())
    row = {'name': 'routed_latency', 'batch': b, 'num_inputs': int(len(exits)),
           'routed_ms_per_image': 1e3 * r_s, 'backbone_ms_per_image': 1e3 * b_s,
           'speedup': b_s / r_s, 'ideal_speedup': ideal, 'speedup_over_ideal': b_s / r_s / ideal,
           'routed_mean_gmacs': float(costs[exits].mean()),
           'exit_counts': dict(zip(p.route_names, np.bincount(exits, minlength=len(costs))
                                   .tolist())), **common}
    if b > 1:
      row['routed_parts_ms_per_image'] = {k: 1e3 * v / (a.repeats * b) for k, v in parts.items()}
    print(json.dumps(row), flush=True)

  # Routing overhead at batch 1 (the paper's real-time case), on the same first input.
  def choice(prm, x, t, c, o):
    return routing.choose_exit(pl.predict(p, prm, pl.prefix(p, prm, *x)), t, c, o)
  choose1 = jax.jit(choice)
  x = tuple(jnp.asarray(v[:1]) for v in inputs)
  cheapest = int(np.argmin(costs))
  t_cheap = timed(lambda: eng.routes[cheapest](params, *x))
  t_choice = timed(lambda: choose1(params, x, t32, c32, o32))
  t_prefix = timed(lambda: eng.prefix(params, *x))
  t_guide = timed(lambda: eng.guide(params, *x))
  t_routed = timed(lambda: eng.routed_one(params, x, t32, c32, o32))
  cost = engine_lib.routing_cost(eng, x, max(a.repeats, 30))
  print(json.dumps({
      'name': 'routing_overhead_batch1', 'cheapest_route': eng.route_name(cheapest),
      'cheapest_route_ms': 1e3 * t_cheap, 'prefix_predictor_choice_ms': 1e3 * t_choice,
      'prefix_ms': 1e3 * t_prefix, 'retrieval_ms': 1e3 * max(t_guide - t_prefix, 0.0),
      'overhead_share_of_cheapest': t_choice / t_cheap,
      'overhead_minus_prefix_share_of_cheapest': max(t_choice - t_prefix, 0.0) / t_cheap,
      'retrieval_share_of_cheapest': max(t_guide - t_prefix, 0.0) / t_cheap,
      'routed_one_ms_this_input': 1e3 * t_routed,
      'routing_cost': cost, 'routing_cost_share_of_cheapest': cost['share_of_cheapest'],
      'note': 'the prefix is shared: the routed call runs it once, the exit continues from it',
      **common}), flush=True)


if __name__ == '__main__':
  main()

"""Report rendering from a sweep result (synthetic numbers: checks the files and tables)."""
import json
import os

import numpy as np
from PIL import Image

from fiancee_jax.core import routing
from fiancee_jax.infer import report, sweep


def _result():
  rng = np.random.default_rng(0)
  true = rng.uniform(0.02, 0.4, size=(30, 2))
  pred = true + rng.normal(0, 0.02, size=true.shape)
  costs = np.array([1.0, 2.0, 5.0])
  rows = routing.sweep_rows(pred, true, costs, (0.05, 0.1, 0.2), 0.2, pred[:15], true[:15])
  lat = {'batch_size': 4, 'num_images': 8, 'repeats': 1, 'per_route_ms_per_image': [1., 2., 4.],
         'backbone_ms_per_image': 4.0, 'routed_ms_per_image': 2.5, 'speedup': 1.6,
         'routed_parts_ms_per_image': {'prefix_and_predictor': .2, 'routes': 2.2,
                                       'host_dispatch': .1},
         'overhead_batch1': {'cheapest_route': 'exit1', 'cheapest_route_ms': 1.0,
                             'prefix_and_predictor_ms': .2, 'prefix_ms': .1,
                             'prefix_and_retrieval_ms': .15, 'predictor_share_of_cheapest': .2,
                             'retrieval_share_of_cheapest': .05},
         'routing_cost_batch1': {'cheapest_route': 'exit1', 'forced_exit': 'exit1',
                                 'routed_forced_ms': 1.25, 'route_alone_ms': 1.0,
                                 'share_of_cheapest': 0.25, 'repeats': 20}}
  summary = {'threshold': 0.1, 'rule': 'conformal', 'meets_target': True,
             'target_mean_lpips': 0.1, 'mean_lpips': 0.05, 'violation_rate': 0.1,
             'gmacs_share': 0.5, 'mean_gmacs': 2.5, 'backbone_gmacs': 5.0, 'offset': 0.01,
             'latency_speedup': 1.6, 'gain_gmacs_per_lpips': float('nan'),
             'routing_overhead_share_of_cheapest': 0.25,
             'paper_rule': {'threshold': 0.2, 'meets_target': True, 'mean_lpips': 0.09,
                            'violation_rate': 0.4, 'gmacs_share': 0.4,
                            'gain_gmacs_per_lpips': 10.0},
             'headline': 'operating_point',
             'best_mean_target': {'threshold': 0.2, 'meets_target': True, 'mean_lpips': 0.0987,
                                  'violation_rate': 0.3, 'gmacs_share': 0.35,
                                  'exit_counts': [1, 1, 1]},
             'num_test': 30, 'device': 'cpu', 'config': 'test'}
  imgs = [rng.uniform(-1, 1, size=(2, 32, 64, 3)) for _ in range(3)]
  return {'summary': summary, 'rows': rows, 'exits': [1, 2], 'costs': costs.tolist(),
          'alpha': 0.2, 'true': true, 'pred': pred, 'true_nobank': true * 1.5,
          'fig9': [{'exit': 1, 'threshold': 0.2, 'single': true[:, 0].tolist(),
                    'routed': (true[:, 0] * 0.5).tolist()}],
          'latency': lat, 'predictor_eval': None,
          'samples': {'labels': np.zeros((2, 32, 64), np.int32), 'exits': imgs,
                      'routed': imgs[0], 'routed_exit': [0, 2]}}


def test_write_report(tmp_path):
  res = _result()
  paths = report.write(str(tmp_path), res)
  for name in report.FIGURES:
    assert os.path.getsize(paths[name]) > 1000, name
  md = open(paths['report']).read()
  # one table row per threshold, with the calibrated exit counts of that row
  for r in res['rows']:
    cells = ' | '.join(str(c) for c in r['calibrated_exit_counts'])
    assert f'| {r["threshold"]:g} |' in md and cells in md
  # routes table: GMACs, mean LPIPS with the bank, then without it (the ablation's exits)
  for e, name in enumerate(('exit 1', 'exit 2')):
    with_bank, without = np.mean(res['true'][:, e]), np.mean(res['true_nobank'][:, e])
    assert f'| {name} | {res["costs"][e]:.3f} | {with_bank:.4f} | {without:.4f} |' in md
  # headline at the operating point, the best-mean threshold beside it
  assert "At threshold **0.1** (conformal; the paper's operating point" in md
  assert 'mean LPIPS <= 0.1 (same rule): 0.2: mean LPIPS 0.0987' in md
  assert 'vs that route alone; the prefix is shared): **25.0%** of the route' in md
  assert 'forced to exit1 1.250 ms vs the route alone 1.000 ms' in md
  s = json.load(open(paths['summary']))
  assert s['gain_gmacs_per_lpips'] == 'nan' and s['gmacs_share'] == 0.5
  assert not [f for f in os.listdir(tmp_path) if '.tmp' in f]


def test_heads_report_from_synthetic_result(tmp_path):
  res = _result()
  n = len(res['true'])
  rng = np.random.default_rng(1)
  imgs = res['samples']['exits']
  res.update(kind='heads', rotation={
      'angle_source': 'ground-truth pose', 'driver_angle': rng.uniform(0, 45, n),
      'key_angle': rng.uniform(0, 30, n), 'exits_taken': rng.integers(0, 3, n).tolist(),
      'threshold': 0.1})
  res['samples'] = {'inputs': [('source', imgs[0]), ('driver', imgs[1]),
                               ('bank frame', imgs[2])],
                    'exits': imgs, 'routed': imgs[1], 'routed_exit': [1, 2]}
  paths = report.write(str(tmp_path), res)
  assert set(report.HEADS_FIGURES) >= {'fig7_exits_gmacs.png', 'fig6_quality_compute.png',
                                       'fig10_exits_vs_rotation.png', 'samples.png'}
  for name in report.HEADS_FIGURES:
    assert os.path.getsize(paths[name]) > 1000, name
  md = open(paths['report']).read()
  taken = np.asarray(res['rotation']['exits_taken'])
  assert '## Routes vs head rotation (Fig. 10)' in md
  assert f'| exit 1 | {int((taken == 0).sum())} | ' in md
  # samples: 3 input columns + backbone + 2 exits + routed, 2 rows
  h, w = imgs[0].shape[1:3]
  assert np.asarray(Image.open(paths['samples.png'])).shape == (2 * h, 7 * w, 3)
  assert not [f for f in os.listdir(tmp_path) if '.tmp' in f]


def test_headline_is_the_operating_point_when_swept():
  rows = [{'threshold': t, 'calibrated_mean_true_lpips': m, 'mean_true_lpips': m + 0.01}
          for t, m in ((0.05, 0.03), (0.1, 0.06), (0.2, 0.095), (0.3, 0.2))]
  (head, met), (paper, pmet), (best, bmet), at = sweep.headlines(rows)
  assert at and head['threshold'] == paper['threshold'] == 0.1 and met and pmet
  assert best['threshold'] == 0.2 and bmet
  (head, _), (paper, _), _, at = sweep.headlines(rows[2:])   # 0.1 not swept
  assert not at and head['threshold'] == 0.2 and paper['threshold'] == 0.2

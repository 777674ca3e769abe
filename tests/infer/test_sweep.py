"""The OASIS sweep report on the trained tiny workdir (opt-in: FIANCEE_PIPELINE_TESTS=1)."""
import json
import math
import os

import pytest

from fiancee_jax import registry
from fiancee_jax.infer import engine as engine_lib
from fiancee_jax.infer import report, rules, sweep
from tests.conftest import tiny_config
from tests.core.test_predictor_data import pipeline, tiny_workdir


@pipeline
def test_sweep_report(tmp_path):
  c = tiny_config()
  wd = tiny_workdir()
  out = str(tmp_path / 'report')
  s = sweep.sweep(registry.get(c), wd, thresholds=(0.05, 0.2, 0.5, 1.0), out_dir=out,
                  repeats=1)
  for key in ('threshold', 'mean_lpips', 'violation_rate', 'gmacs_share', 'latency_speedup',
              'device'):
    assert key in s
  assert 0 < s['gmacs_share'] <= 1 and 0 <= s['violation_rate'] <= 1
  assert math.isfinite(s['latency_speedup']) and s['latency_speedup'] > 0
  assert s['rule'] == 'calibrated' and s['alpha'] == c.routing.alpha
  assert s['calibration_rows'] > 0 and 'offset' in s and s['rule_description']
  with open(os.path.join(out, 'summary.json')) as f:
    assert json.load(f)['threshold'] == s['threshold']
  for name in report.FIGURES + ('report.md',):
    assert os.path.getsize(os.path.join(out, name)) > 0, name


@pipeline
def test_sweep_rules(tmp_path):
  """The sweep's rule columns follow --rule: ltt's headline offset is the rule's own for its
  threshold; paper = offset 0, so its columns are the paper-rule ones."""
  c = tiny_config()
  wd = tiny_workdir()
  bb = registry.get(c)
  kw = dict(thresholds=(0.2, 0.5), repeats=1, num_samples=1)
  rule = rules.check('ltt', c.routing.alpha, 0.1)
  ltt = sweep.sweep(bb, wd, out_dir=str(tmp_path / 'l'), rule=rule, **kw)
  assert (ltt['rule'], ltt['alpha'], ltt['delta']) == ('ltt', c.routing.alpha, 0.1)
  eng = engine_lib.Engine(engine_lib.load(bb, wd))
  want = rules.calibrate(rule, bb, wd, eng.pipeline).offset(ltt['threshold'], eng.costs)
  assert ltt['offset'] == want or ltt['offset'] == pytest.approx(want, abs=1e-6)
  paper = sweep.sweep(bb, wd, out_dir=str(tmp_path / 'p'), engine=eng,
                      rule=rules.check('paper'), **kw)
  assert (paper['rule'], paper['offset'], paper['calibration_rows']) == ('paper', 0.0, 0)
  assert paper['mean_lpips'] == paper['paper_rule']['mean_lpips']

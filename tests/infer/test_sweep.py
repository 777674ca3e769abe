"""The OASIS sweep report on the trained tiny workdir (opt-in: FIANCEE_PIPELINE_TESTS=1)."""
import json
import math
import os

from fiancee_jax import registry
from fiancee_jax.infer import report, sweep
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
  with open(os.path.join(out, 'summary.json')) as f:
    assert json.load(f)['threshold'] == s['threshold']
  for name in report.FIGURES + ('report.md',):
    assert os.path.getsize(os.path.join(out, name)) > 0, name

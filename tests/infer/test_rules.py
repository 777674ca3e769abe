"""infer/rules.py: the routing rule of every command that routes, from the flags and the
calibration rows the predictor stage cached (a fake cache and predictor here; the trained
tiny workdir: tests/infer/test_engine.py, test_sweep.py)."""
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax import registry
from fiancee_jax.core import calibration, predictor_data, routing
from fiancee_jax.core.predictor_data import PredictorDataError
from fiancee_jax.errors import FianceeError
from fiancee_jax.infer import rules
from fiancee_jax.infer.inputs import InferError
from tests.conftest import tiny_config

COSTS = np.array([1.0, 2.0, 5.0])   # two exits, then the backbone


def test_flags_default_is_the_calibrated_rule():
  r = rules.check(default_alpha=0.2)
  assert (r.name, r.alpha, r.delta) == ('calibrated', 0.2, None)
  r = rules.check('ltt', 0.05, 0.2)
  assert (r.name, r.alpha, r.delta) == ('ltt', 0.05, 0.2)
  assert rules.check('ltt').delta == rules.DEFAULT_DELTA
  assert rules.check('paper').offset(0.1, COSTS) == 0.0
  manual = rules.check(offset=0.03)
  assert manual.name == rules.MANUAL and manual.offset(0.3, COSTS) == 0.03
  assert manual.info(0.3, COSTS) == {'rule': 'manual', 'offset': 0.03}


@pytest.mark.parametrize('kw, match', [
    (dict(rule='paper', offset=0.1), r"--offset=0.1 and --rule='paper': give one"),
    (dict(rule='bonferroni'), r"--rule='bonferroni': expected one of calibrated, ltt, paper"),
    (dict(alpha=1.5), r'--alpha=1.5: expected'),
    (dict(alpha=0.0), r'--alpha=0.0: expected'),
    (dict(rule='ltt', delta=1.0), r'--delta=1.0: expected'),
    (dict(offset=math.nan), r'--offset=nan: expected a finite'),
])
def test_bad_flags_are_one_error(kw, match):
  with pytest.raises(InferError, match=match):
    rules.check(**kw)


class _Pred(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(x)


class _Pipeline:
  """What `rules.calibrate` reads of a pipeline: the predictor and its params."""

  def __init__(self, feat_dim):
    self.predictor = _Pred()
    params = self.predictor.init(jax.random.PRNGKey(0), jnp.zeros((1, feat_dim)))['params']
    self.params = {'predictor': {'params': params}}


def _write_cache(bb, workdir, targets, feats):
  rows = bb.predictor_rows().rows(workdir, 'calibration')
  fp = predictor_data.fingerprint(bb.config, workdir, 'calibration', *rows.index.values())
  predictor_data.save_npz(predictor_data.cache_path(workdir, 'calibration'),
                          {'feats': feats, 'targets': targets, **rows.index,
                           'fingerprint': np.array(fp)})
  return len(rows)


def test_calibrated_rules_use_the_cached_rows_and_the_predictor(tmp_path):
  bb = registry.get(tiny_config())
  workdir = str(tmp_path / 'wd')
  n = len(bb.predictor_rows().rows(workdir, 'calibration'))
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(n, 4)).astype(np.float32)
  targets = rng.uniform(0, 0.3, (n, 2)).astype(np.float32)
  _write_cache(bb, workdir, targets, feats)
  pipe = _Pipeline(4)
  pred = np.asarray(pipe.predictor.apply({'params': pipe.params['predictor']['params']}, feats))
  for rule, want in (
      (rules.check(alpha=0.3), routing.conformal_offset(pred, targets, 0.2, 0.3, COSTS)),
      (rules.check('ltt', 0.3, 0.4),
       calibration.ltt_offset(pred, targets, 0.2, 0.3, 0.4, COSTS))):
    r = rules.calibrate(rule, bb, workdir, pipe)
    assert r.num_rows == n
    got = r.offset(0.2, COSTS)
    assert got == pytest.approx(want, abs=1e-5) or got == want   # +-inf for few rows
    info = r.info(0.2, COSTS)
    assert info['rule'] == rule.name and info['calibration_rows'] == n
    assert info['alpha'] == 0.3 and ('delta' in info) == (rule.name == 'ltt')
    assert r.describe()


def test_a_missing_or_stale_cache_names_the_predictor_stage(tmp_path):
  bb = registry.get(tiny_config())
  workdir = str(tmp_path / 'wd')
  pipe = _Pipeline(4)
  with pytest.raises(PredictorDataError, match=r'no calibration rows at .*dataset_calibration'
                     r'\.npz.*run `python train.py --stage=predictor --config configs/'):
    rules.calibrate(rules.check(), bb, workdir, pipe)
  assert not os.path.exists(workdir)                       # nothing written on the way
  assert rules.calibrate(rules.check('paper'), bb, workdir, pipe).name == 'paper'  # no rows
  n = len(bb.predictor_rows().rows(workdir, 'calibration'))
  _write_cache(bb, workdir, np.zeros((n, 2), np.float32), np.zeros((n, 4), np.float32))
  with np.load(predictor_data.cache_path(workdir, 'calibration')) as f:
    arrays = dict(f)
  arrays['fingerprint'] = np.array('another')
  predictor_data.save_npz(predictor_data.cache_path(workdir, 'calibration'), arrays)
  with pytest.raises(FianceeError, match=r'were made from other checkpoints.*rerun `python '
                     r'train.py --stage=predictor'):
    rules.calibrate(rules.check('ltt'), bb, workdir, pipe)

"""core/calibration.py: the routing rules' offsets, on synthetic exchangeable data.

The guarantees are checked as they are stated, over many calibration draws from one
distribution (a large test set of the same distribution standing in for it): the conformal
offset bounds the mean violation rate by alpha; the Learn-then-Test offset bounds the
violation rate by alpha in all but a delta share of draws (which the conformal one does not).
"""
import math

import numpy as np
import pytest
from scipy import stats

from fiancee_jax.core import calibration, routing

COSTS = np.array([1.0, 2.0, 3.0, 10.0])   # three exits, then the backbone
T = 0.1


def draw(rng, n):
  """(pred, true) (n, 3) i.i.d. rows: true LPIPS grows with a per-input difficulty and falls
  along the exits; the predictor sees it with noise (so the paper rule violates often)."""
  d = rng.uniform(0, 1, (n, 1))
  true = d * np.array([0.3, 0.2, 0.12]) + rng.normal(0, 0.01, (n, 3))
  pred = true + rng.normal(0, 0.03, (n, 3))
  return pred, true


def test_rate(pred, true, lam):
  exits = np.asarray(routing.choose_exit(pred, T, COSTS, offset=lam))
  return routing.violation_rate(routing.chosen_lpips(true, exits), T)


test_rate.__test__ = False  # a helper, not a test


@pytest.fixture(scope='module')
def draws():
  """Test violation rates of both rules over 300 calibration draws of 300 rows each."""
  rng = np.random.default_rng(0)
  pred_t, true_t = draw(rng, 60000)
  alpha, delta = 0.1, 0.1
  out = {'conformal': [], 'ltt': [], 'paper': test_rate(pred_t, true_t, 0.0)}
  for _ in range(300):
    p, y = draw(rng, 300)
    out['conformal'].append(test_rate(
        pred_t, true_t, routing.conformal_offset(p, y, T, alpha, COSTS)))
    out['ltt'].append(test_rate(
        pred_t, true_t, calibration.ltt_offset(p, y, T, alpha, delta, COSTS)))
  return {k: np.asarray(v) for k, v in out.items()}


def test_paper_rule_violates_on_this_data(draws):
  assert draws['paper'] > 0.14   # > alpha: else the tests below would not test anything


def test_conformal_controls_the_mean_violation_rate(draws):
  r = draws['conformal']
  assert r.mean() <= 0.1 + 0.006, r.mean()
  assert r.mean() >= 0.1 - 0.03, r.mean()        # and is not trivially conservative
  assert np.mean(r > 0.1) > 0.25                 # but single draws exceed alpha often


def test_ltt_controls_the_violation_rate_with_probability_1_minus_delta(draws):
  r = draws['ltt']
  assert np.mean(r > 0.1) <= 0.1 + 0.05, np.mean(r > 0.1)
  assert r.mean() >= 0.04, r.mean()              # not everything sent to the backbone
  assert r.mean() < draws['conformal'].mean()


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_ltt_offset_is_the_binomial_tail_order_statistic(seed):
  """#{scores >= lam} = k*, the largest count whose binomial tail P(Bin(n, alpha) <= k) is
  <= delta; one more violation would not be rejected."""
  p, y = draw(np.random.default_rng(seed), 500)
  alpha, delta = 0.1, 0.05
  lam = calibration.ltt_offset(p, y, T, alpha, delta, COSTS)
  u = routing.violation_scores(p, y, T, COSTS)
  k = int(np.sum(u >= lam))
  assert stats.binom.cdf(k, 500, alpha) <= delta < stats.binom.cdf(k + 1, 500, alpha)
  assert lam >= routing.conformal_offset(p, y, T, alpha, COSTS)


def test_ltt_offset_edges():
  p, y = draw(np.random.default_rng(3), 10)
  assert calibration.ltt_offset(p, y, T, 0.1, 0.1, COSTS) == math.inf   # 0.9**10 > delta
  easy = np.zeros((50, 3))                                              # nothing can violate
  assert calibration.ltt_offset(easy, easy, T, 0.1, 0.1, COSTS) == -math.inf
  for bad in (0.0, 1.0, -0.1):
    with pytest.raises(ValueError, match='delta'):
      calibration.ltt_offset(p, y, T, 0.1, bad, COSTS)


def test_offset_dispatch():
  p, y = draw(np.random.default_rng(4), 200)
  assert calibration.offset('paper', None, None, T, COSTS, 0.1) == 0.0
  assert calibration.offset('calibrated', p, y, T, COSTS, 0.1) == \
      routing.conformal_offset(p, y, T, 0.1, COSTS)
  assert calibration.offset('ltt', p, y, T, COSTS, 0.1, 0.2) == \
      calibration.ltt_offset(p, y, T, 0.1, 0.2, COSTS)
  with pytest.raises(ValueError, match='rule'):
    calibration.offset('bonferroni', p, y, T, COSTS, 0.1)
  with pytest.raises(ValueError, match='calibration rows'):
    calibration.offset('calibrated', None, None, T, COSTS, 0.1)
  with pytest.raises(ValueError, match='delta'):
    calibration.offset('ltt', p, y, T, COSTS, 0.1)
  for rule in calibration.RULES:
    assert calibration.describe(rule, 0.1, 0.1, 200)

"""Which offset the routing rule adds to the predictions, from held-out calibration rows.

`routing.choose_exit(pred, t, costs, offset=lam)` allows exit e iff pred_e + lam <= t. The
rules (`RULES`), all for one threshold t and the calibration rows (pred_cal, true_cal) =
(predictions of the trained predictor, true LPIPS of every exit vs the backbone image):

  paper       lam = 0: the paper's rule (Sec. 3.2). No guarantee.
  calibrated  lam = `routing.conformal_offset` (split conformal / conformal risk control).
              If the calibration rows and a test input are exchangeable,
                P(true LPIPS of the exit the test input takes > t) <= alpha,
              on average over the calibration draw: the expected violation rate of a test set
              is <= alpha, but one unlucky calibration draw may give a rate above alpha.
  ltt         lam = `ltt_offset` (Learn-then-Test, Angelopoulos et al. 2021, with a binomial
              tail p-value and fixed-sequence testing). Under the same exchangeability (i.i.d.
              rows), with probability >= 1 - delta over the calibration draw, the violation
              rate of the chosen lam (the probability a fresh input violates) is <= alpha.
              Stronger, so lam is larger (more inputs go to costlier exits).

A violation is one input whose chosen exit's true LPIPS exceeds t (the backbone never
violates). None of the rules bounds the violation rate per exit or per input, and each holds
for the threshold it was computed for.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats

from fiancee_jax.core import routing

RULES = ('calibrated', 'ltt', 'paper')

Array = Any


def _check_delta(delta: float) -> None:
  d = float(delta)
  if not 0 < d < 1:
    raise ValueError(f'delta={delta!r}: expected a failure probability strictly in (0, 1)')


def ltt_offset(pred_cal: Array, true_cal: Array, threshold: float, alpha: float, delta: float,
               costs: Array) -> float:
  """Offset lam such that, with probability >= 1 - delta over the calibration draw, a fresh
  input routed with `choose_exit(pred, threshold, costs, offset=lam)` violates (chosen exit's
  true LPIPS > threshold) with probability <= alpha. Assumes the N calibration rows and test
  inputs are i.i.d. (exchangeable with a predictor trained on other rows).

  Construction: the loss 1[lam <= U_i] (`routing.violation_scores`) is an upper envelope of
  input i's violation indicator and non-increasing in lam, so its risk R(lam) = P(U >= lam)
  is too. For each lam test H_lam: R(lam) > alpha with the binomial tail p-value
  P(Bin(N, alpha) <= #{U_i >= lam}) (valid: under H_lam the count is stochastically larger
  than Bin(N, alpha)), going from lam = +inf downwards and stopping at the first lam not
  rejected at level delta (fixed-sequence testing: family-wise error <= delta because R is
  monotone). Every rejected lam has R(lam) <= alpha except with probability delta; the
  smallest is returned. The p-value only depends on the count, so the result is the
  (k* + 1)-th largest score (+ the rounding guard), k* = max{k : BinomCDF(k; N, alpha) <= delta}.
  lam = +inf (everything to the backbone) when even k = 0 is not rejected
  ((1 - alpha)^N > delta, i.e. N < log(delta) / log(1 - alpha)); -inf when k* >= N.
  """
  routing._check_alpha(alpha)
  _check_delta(delta)
  scores = routing.violation_scores(pred_cal, true_cal, threshold, costs)
  n = scores.shape[0]
  cdf = stats.binom.cdf(np.arange(n + 1), n, float(alpha))
  ok = np.nonzero(cdf <= float(delta))[0]
  if len(ok) == 0:
    return math.inf
  k = int(ok[-1])
  if k >= n:
    return -math.inf
  u = float(np.sort(scores)[::-1][k])   # the (k + 1)-th largest
  return u + routing._ROUNDING_GUARD if math.isfinite(u) else u


def offset(rule: str, pred_cal: Array | None, true_cal: Array | None, threshold: float,
           costs: Array, alpha: float, delta: float | None = None) -> float:
  """The offset of `rule` (one of RULES) for this threshold; 'paper' needs no rows."""
  if rule == 'paper':
    return 0.0
  if rule not in RULES:
    raise ValueError(f'rule={rule!r}: expected one of {RULES}')
  if pred_cal is None or true_cal is None:
    raise ValueError(f'rule {rule!r} without pred_cal/true_cal: expected calibration rows')
  if rule == 'calibrated':
    return routing.conformal_offset(pred_cal, true_cal, threshold, alpha, costs)
  if delta is None:
    raise ValueError("rule 'ltt' without delta: expected a failure probability in (0, 1)")
  return ltt_offset(pred_cal, true_cal, threshold, alpha, delta, costs)


def describe(rule: str, alpha: float, delta: float | None, num_rows: int) -> str:
  """One phrase for reports: what the rule is and what it guarantees."""
  if rule == 'paper':
    return 'paper rule (offset 0, no guarantee)'
  if rule == 'calibrated':
    return (f'conformal offset (alpha={alpha:g}: expected violation rate <= alpha) calibrated '
            f'on {num_rows} held-out inputs')
  if rule == 'ltt':
    return (f'Learn-then-Test offset (violation rate <= alpha={alpha:g} with probability '
            f'>= {1 - delta:g} over the calibration draw) calibrated on {num_rows} held-out '
            'inputs')
  return f'offset given by hand ({rule})'

"""Tests for fiancee_jax/routing.py: rule, conformal calibration, jitted and bucketed paths,
budget mode, input errors."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax.core import routing

COSTS = np.array([20.0, 40.0, 60.0, 80.0, 100.0])  # 4 branch exits + backbone (GMACs)


# --- the rule ---------------------------------------------------------------------------------


def test_choose_exit_cheapest_feasible_and_fallback():
  pred = np.array([
      [0.30, 0.09, 0.05, 0.01],  # exit 1 is the cheapest <= 0.1
      [0.05, 0.01, 0.01, 0.01],  # exit 0
      [0.20, 0.20, 0.20, 0.11],  # none -> backbone (4)
      [0.20, 0.20, 0.20, 0.10],  # exactly at the threshold counts as feasible
      [np.nan, 0.5, 0.02, 0.5],  # NaN is never feasible
  ])
  got = np.asarray(routing.choose_exit(pred, 0.1, COSTS))
  np.testing.assert_array_equal(got, [1, 0, 4, 3, 2])
  # Costs decide, not the index: make exit 2 cheaper than exit 1.
  costs = np.array([20.0, 50.0, 30.0, 80.0, 100.0])
  assert int(routing.choose_exit(pred[0], 0.1, costs)) == 2
  # A branch dearer than the backbone never wins over it.
  costs = np.array([120.0, 140.0, 160.0, 180.0, 100.0])
  np.testing.assert_array_equal(np.asarray(routing.choose_exit(pred, 0.1, costs)), 4)
  # Offsets shift predictions: +0.06 pushes row 0 from exit 1 to exit 3.
  assert int(routing.choose_exit(pred[0], 0.1, COSTS, offset=0.06)) == 3


def test_choose_exit_matches_bruteforce_random():
  rng = np.random.default_rng(0)
  pred = rng.uniform(0, 0.3, (200, 4))
  costs = rng.permutation(COSTS[:4]).tolist() + [100.0]
  got = np.asarray(routing.choose_exit(pred, 0.12, costs))
  for p, g in zip(pred, got):
    feasible = [e for e in range(4) if p[e] <= 0.12] + [4]
    assert g == min(feasible, key=lambda e: (costs[e], e))


# --- conformal calibration --------------------------------------------------------------------


def _synthetic(rng, n):
  """Exchangeable rows; LPIPS falls with the exit; noise grows with input difficulty."""
  d = rng.uniform(0, 1, (n, 1))
  mean = (0.25 - 0.05 * np.arange(4)) * (0.5 + d)
  sd = 0.02 + 0.06 * d
  true = np.clip(mean + sd * rng.standard_normal((n, 4)), 0, None)
  pred = mean + 0.01 * rng.standard_normal((n, 4))  # a good but imperfect predictor
  return pred, true


@pytest.mark.parametrize('threshold', [0.1, 0.2])
def test_conformal_controls_violation_rate(threshold):
  alpha, trials, n = 0.1, 150, 600
  rng = np.random.default_rng(1)
  cal_rates, raw_rates, cal_costs, envelope = [], [], [], []
  for k in range(trials):
    pred, true = _synthetic(rng, n)
    cal, test = routing.calibration_split(n, 0.5, seed=k)
    lam = routing.conformal_offset(pred[cal], true[cal], threshold, alpha, COSTS)
    # The score event U >= lam is what split conformal controls exactly (both sides).
    envelope.append(np.mean(routing.violation_scores(pred[test], true[test], threshold, COSTS)
                            >= lam))
    for offset, rates in ((lam, cal_rates), (0.0, raw_rates)):
      exits = np.asarray(routing.choose_exit(pred[test], threshold, COSTS, offset))
      rates.append(routing.violation_rate(routing.chosen_lpips(true[test], exits), threshold))
      if rates is cal_rates:
        cal_costs.append(COSTS[exits].mean())
  slack = 3 * np.sqrt(alpha * (1 - alpha) / (trials * n / 2))  # ~3 std of the mean
  assert np.mean(cal_rates) <= np.mean(envelope) + 1e-12  # violations imply the score event
  # Split conformal with continuous scores: alpha - 1/(n_cal+1) <= P(U_test >= lam) <= alpha.
  assert alpha - 1 / (n / 2 + 1) - slack <= np.mean(envelope) <= alpha + slack, np.mean(envelope)
  assert np.mean(cal_rates) <= alpha + slack, np.mean(cal_rates)
  assert np.mean(raw_rates) > alpha + 0.05, np.mean(raw_rates)
  assert np.mean(raw_rates) > np.mean(cal_rates) + 0.05
  assert np.mean(cal_costs) < COSTS[-1] - 5  # calibrated routing still uses branches


def test_conformal_offset_extremes():
  rng = np.random.default_rng(2)
  pred, true = _synthetic(rng, 8)
  # Too few calibration rows for alpha: everything to the backbone.
  assert routing.conformal_offset(pred, true, 0.1, 0.05, COSTS) == np.inf
  # No calibration row can violate: any exit is fine (offset -inf).
  assert routing.conformal_offset(pred, np.zeros_like(true), 0.1, 0.2, COSTS) == -np.inf


def test_violation_scores_match_offset_scan():
  """U_i is the largest offset at which input i is routed to a violating exit."""
  rng = np.random.default_rng(3)
  pred, true = _synthetic(rng, 40)
  t = 0.15
  scores = routing.violation_scores(pred, true, t, COSTS)
  grid = np.linspace(-0.5, 0.5, 2001)
  for i in range(len(pred)):
    exits = np.asarray(routing.choose_exit(pred[i:i + 1], t, COSTS, grid[:, None]))
    got = np.concatenate([true[i], [0.0]])[exits]
    bad = grid[got > t]
    if bad.size:
      assert abs(bad.max() - scores[i]) <= 1e-3
    else:
      assert scores[i] < grid[0] or scores[i] == -np.inf


def test_sweep_rows():
  rng = np.random.default_rng(4)
  pred, true = _synthetic(rng, 400)
  rows = routing.sweep_rows(pred[200:], true[200:], COSTS, [0.1, 0.3], alpha=0.1,
                            pred_cal=pred[:200], true_cal=true[:200])
  assert [r['threshold'] for r in rows] == [0.1, 0.3]
  for r in rows:
    for p in ('', 'calibrated_'):
      assert sum(r[p + 'exit_counts']) == 200
      counts = np.array(r[p + 'exit_counts'])
      assert np.isclose(r[p + 'mean_gmacs'], (counts * COSTS).sum() / 200)
  # Looser threshold -> cheaper on average.
  assert rows[1]['mean_gmacs'] < rows[0]['mean_gmacs']


# --- jitted single-input path -----------------------------------------------------------------


def _conv_exit(depth):
  def f(params, x):
    for w in params['exits'][depth]:
      x = jnp.tanh(jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
    return x
  return f


def _conv_params(seed, num_exits=3, ch=4):
  rng = np.random.default_rng(seed)  # numpy: no per-shape compiles of jax.random ops
  return {'exits': [[jnp.asarray(0.3 * rng.standard_normal((3, 3, ch, ch)), jnp.float32)
                     for _ in range(d + 1)] for d in range(num_exits)],
          'pred': jnp.asarray(0.1 * rng.standard_normal((ch, num_exits - 1)), jnp.float32)}


def test_routed_apply_runs_only_chosen_branch():
  params = _conv_params(0)
  exits = tuple(_conv_exit(d) for d in range(3))
  costs = jnp.array([1.0, 2.0, 3.0])
  fired = []

  def tagged(e):
    def f(params, x):
      jax.debug.callback(lambda: fired.append(e))
      return exits[e](params, x)
    return f

  prefix = lambda p, x: x[None]  # noqa: E731
  predict = lambda p, f: jnp.abs(jnp.mean(f, axis=(0, 1, 2)) @ p['pred'])  # noqa: E731
  run = jax.jit(routing.routed_apply, static_argnums=(0, 1, 2))
  x = jnp.asarray(np.random.default_rng(1).standard_normal((6, 6, 4)), jnp.float32)
  pred = np.asarray(predict(params, x[None]))
  branches = tuple(tagged(e) for e in range(3))
  for t in (10.0, float(pred.mean()), float(pred.min()) / 2):
    want = next((e for e in range(2) if pred[e] <= t), 2)  # costs are in index order
    fired.clear()
    out, aux = run(prefix, predict, branches, params, x, t, costs)
    jax.effects_barrier()
    assert int(aux['exit']) == want
    assert fired == [want]  # only the chosen branch executed
    np.testing.assert_allclose(out, exits[want](params, x[None]), rtol=1e-6, atol=1e-6)
  # Under vmap with a batched index, switch becomes select: every branch runs.
  fired.clear()
  idx = jnp.array([0, 2])
  jax.jit(jax.vmap(lambda i, x: routing.switch_apply(
      branches, i, params, x[None])))(idx, jnp.stack([x, x]))
  jax.effects_barrier()
  assert sorted(set(fired)) == [0, 1, 2]


def test_switch_apply_rejects_batched_index():
  with pytest.raises(ValueError, match='index'):
    routing.switch_apply([lambda x: x], jnp.array([0, 0]), 1.0)


# --- batched bucketed path --------------------------------------------------------------------


def test_run_bucketed_equals_per_input_and_bounds_compiles():
  params = _conv_params(2)
  traces = [0, 0, 0]

  def make(d):
    def f(p, x):
      traces[d] += 1  # runs once per trace (new input shape)
      return _conv_exit(d)(p, x), jnp.sum(x, axis=(1, 2, 3))  # a pytree output
    return functools.partial(jax.jit(f), params)

  rng = np.random.default_rng(5)
  for sizes in ((1, 4, 16), (4, 16)):   # (4, 16): tails of < 4 rows are padded, then dropped
    traces[:] = [0, 0, 0]
    fns = [make(d) for d in range(3)]
    for counts in ((1, 5, 17), (3, 16, 40), (0, 2, 9)):  # groups crossing bucket bounds
      exits = rng.permutation(np.repeat(np.arange(3), counts))
      x = rng.standard_normal((len(exits), 5, 5, 4)).astype(np.float32)
      out, sums = routing.run_bucketed(fns, exits, jnp.asarray(x), bucket_sizes=sizes)
      assert out.shape == (len(exits), 5, 5, 4)
      ref = [jax.device_get(fns[e](x[i:i + 1])) for i, e in enumerate(exits)]  # one at a time
      np.testing.assert_allclose(out, np.concatenate([o for o, _ in ref]), rtol=1e-5,
                                 atol=1e-5)
      np.testing.assert_allclose(sums, np.concatenate([s for _, s in ref]), rtol=1e-5,
                                 atol=1e-5)
    # one trace per bucket size (+1: the batch-1 reference calls when 1 is not a bucket)
    assert all(1 <= n <= len(sizes) + (1 not in sizes) for n in traces), (sizes, traces)


def test_bucket_chunks():
  assert routing._bucket_chunks(0, (1, 4, 16)) == []
  assert routing._bucket_chunks(5, (1, 4, 16)) == [(4, 4), (1, 1)]
  assert routing._bucket_chunks(35, (1, 4, 16)) == [(16, 16), (16, 16), (1, 1), (1, 1), (1, 1)]
  assert routing._bucket_chunks(23, (1, 2, 4, 8, 16, 32)) == [(16, 16), (4, 4), (2, 2), (1, 1)]
  assert routing._bucket_chunks(6, (4, 16)) == [(4, 4), (2, 4)]   # only the tail is padded
  assert routing._bucket_chunks(3, (4, 16)) == [(3, 4)]


# --- budget mode ------------------------------------------------------------------------------


def test_budget_exits_vs_bruteforce():
  rng = np.random.default_rng(6)
  costs = np.array([10.0, 25.0, 45.0, 100.0])
  for trial in range(40):
    b = int(rng.integers(1, 6))
    pred = rng.uniform(0, 0.4, (b, 3))
    budget = float(rng.uniform(10.0, 100.0))
    exits, lp_bound, gap = routing._budget_greedy(pred, costs, budget)
    full = np.concatenate([pred, np.zeros((b, 1))], axis=1)
    assert costs[exits].mean() <= budget + 1e-9
    best = min(full[np.arange(b), c].mean()
               for c in itertools.product(range(4), repeat=b)
               if costs[list(c)].mean() <= budget + 1e-9)
    got = full[np.arange(b), exits].mean()
    assert lp_bound <= best + 1e-12  # the LP relaxation bounds the optimum from below
    assert best - 1e-12 <= got <= best + gap + 1e-12
    np.testing.assert_array_equal(routing.budget_exits(pred, costs, budget), exits)
  # Unlimited budget: the backbone (pred 0) everywhere; minimal budget: the cheapest exit.
  np.testing.assert_array_equal(routing.budget_exits(pred, costs, 1e9), 3)
  np.testing.assert_array_equal(routing.budget_exits(pred, costs, 10.0), 0)


# --- bad inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize('t', [0.0, -0.1, float('nan'), float('inf')])
def test_bad_threshold(t):
  with pytest.raises(ValueError, match='threshold'):
    routing.choose_exit(np.zeros((2, 4)), t, COSTS)


@pytest.mark.parametrize('alpha', [0.0, 1.0, 1.5, -0.1])
def test_bad_alpha(alpha):
  with pytest.raises(ValueError, match='alpha'):
    routing.conformal_offset(np.zeros((10, 4)), np.zeros((10, 4)), 0.1, alpha, COSTS)


def test_bad_shapes_and_budget():
  with pytest.raises(ValueError, match='costs'):
    routing.choose_exit(np.zeros((2, 3)), 0.1, COSTS)
  with pytest.raises(ValueError, match='true'):
    routing.conformal_offset(np.zeros((10, 4)), np.zeros((9, 4)), 0.1, 0.1, COSTS)
  with pytest.raises(ValueError, match='exits'):
    routing.run_bucketed([lambda x: x], np.zeros(3, int), jnp.zeros((4, 2)))
  with pytest.raises(ValueError, match='exits'):
    routing.run_bucketed([lambda x: x], np.array([0, 1]), jnp.zeros((2, 2)))
  with pytest.raises(ValueError, match='bucket_sizes'):
    routing.run_bucketed([lambda x: x], np.zeros(2, int), jnp.zeros((2, 2)), (4, 1))
  with pytest.raises(ValueError, match='mean_budget'):
    routing.budget_exits(np.zeros((2, 4)), COSTS, 19.0)


def test_bucket_plan_positions_invert_the_gather():
  """Row i's output is at positions[i] of the chunks' outputs, concatenated; padding rows are
  never picked; every chunk is one route's rows at a bucket size."""
  rng = np.random.default_rng(3)
  exits = rng.integers(0, 3, 23)
  chunks, positions = routing.bucket_plan(exits, 3, (1, 4, 16))
  gathered = np.concatenate([g for _, g in chunks])
  np.testing.assert_array_equal(gathered[positions], np.arange(23))
  assert all(len(g) in (1, 4, 16) and set(exits[g]) == {e} for e, g in chunks)
  assert len(set(positions.tolist())) == 23
  x = jnp.asarray(rng.standard_normal((23, 2)), jnp.float32)
  outs = [x[g] * (e + 1) for e, g in chunks]        # route e scales by e + 1
  np.testing.assert_allclose(routing.assemble(outs, positions), x * (exits[:, None] + 1),
                             rtol=1e-6)
  with pytest.raises(ValueError, match='expected ints'):
    routing.bucket_plan(np.array([0, 3]), 3)

"""Exit routing: predicted LPIPS per exit -> the exit that runs (Sec. 3.2, 3.4).

Conventions used by every function here:
  * `pred`  (..., E): predicted LPIPS of each of the E branch exits (the predictor's output).
  * `costs` (E+1,):   GMACs of the full path through each branch exit, then the backbone
    (index E). The backbone's LPIPS against itself is 0, so it is always feasible.
  * An exit index is in [0, E]; E means "run the whole backbone".

Rule (Sec. 3.2): the cheapest exit whose predicted LPIPS <= threshold; the backbone is the
fallback. Beyond the paper, `conformal_offset` turns the rule into one with a distribution-free
bound on the share of outputs whose true LPIPS exceeds the threshold.

Two execution paths (measured: under vmap a batched `lax.switch` index becomes `select` and runs
every branch):
  * one input, all inside jit: `routed_apply` = prefix -> predictor -> `choose_exit` ->
    `switch_apply` (`lax.switch` with a scalar index runs only the chosen branch);
  * a batch: `bucket_plan` groups inputs by exit on the host, each exit's jitted function
    runs on its group in chunks of a few fixed sizes, and `assemble` puts the outputs back in
    order once (`run_bucketed`; under `vmap`, `lax.switch` with a batched index becomes
    `select` and computes every branch).
`budget_exits` picks exits for a batch under a mean-GMAC budget instead of a threshold.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = Any
PyTree = Any

# Added to the conformal offset so float32 routing (pred + offset <= t) cannot flip a
# calibration decision by rounding; immaterial at LPIPS scale.
_ROUNDING_GUARD = 1e-6


# ---------------------------------------------------------------------------------------------
# Input checks (one clear ValueError each).


def _is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def _check_threshold(threshold: Any, name: str = 'threshold') -> None:
  if _is_traced(threshold):
    return
  t = np.asarray(threshold)
  if t.ndim != 0:
    raise ValueError(f'{name} has shape {t.shape}: expected a scalar LPIPS value')
  t = float(t)
  if not math.isfinite(t) or t <= 0:
    raise ValueError(f'{name}={t!r}: expected a finite LPIPS value > 0')


def _check_alpha(alpha: float) -> None:
  a = float(alpha)
  if not 0 < a < 1:
    raise ValueError(f'alpha={alpha!r}: expected a violation share strictly in (0, 1)')


def _check_pred_costs(pred_shape: Sequence[int], costs_shape: Sequence[int]) -> None:
  if len(costs_shape) != 1:
    raise ValueError(f'costs has shape {tuple(costs_shape)}: expected (E+1,) GMACs, '
                     'branch exits then the backbone')
  if len(pred_shape) < 1 or pred_shape[-1] + 1 != costs_shape[0]:
    raise ValueError(f'pred has shape {tuple(pred_shape)} and costs {tuple(costs_shape)}: '
                     'expected pred (..., E) and costs (E+1,) (the backbone cost last)')


def _check_costs_values(costs: np.ndarray) -> None:
  if not np.all(np.isfinite(costs)) or np.any(costs < 0):
    raise ValueError(f'costs={costs.tolist()}: expected finite GMACs >= 0')


def _check_pair(pred: np.ndarray, true: np.ndarray, name: str = 'true') -> None:
  if pred.shape != true.shape or pred.ndim != 2 or pred.shape[0] == 0:
    raise ValueError(f'pred has shape {pred.shape} and {name} {true.shape}: expected the same '
                     'shape (N, E) with N >= 1')
  if not (np.all(np.isfinite(pred)) and np.all(np.isfinite(true))):
    raise ValueError(f'pred or {name} holds NaN/inf: expected finite LPIPS values')


# ---------------------------------------------------------------------------------------------
# The rule.


def choose_exit(pred: Array, threshold: Array, costs: Array, offset: Array = 0.0) -> jax.Array:
  """The cheapest exit with `pred + offset <= threshold`, else the backbone (index E).

  pred (..., E), costs (E+1,) -> (...,) int32. Jittable (threshold/offset may be traced).
  Ties in cost go to the lower index. A NaN prediction is never feasible (safe side).
  `offset` is the conformal offset for this threshold (`conformal_offset`); 0 = the paper's rule.
  """
  pred = jnp.asarray(pred)
  costs = jnp.asarray(costs)
  _check_pred_costs(pred.shape, costs.shape)
  _check_threshold(threshold)
  feasible = pred + offset <= threshold
  feasible = jnp.concatenate([feasible, jnp.ones(feasible.shape[:-1] + (1,), bool)], axis=-1)
  masked = jnp.where(feasible, costs.astype(jnp.float32), jnp.inf)
  return jnp.argmin(masked, axis=-1).astype(jnp.int32)


def chosen_lpips(lpips: Array, exits: Array) -> np.ndarray:
  """LPIPS of the exit each input took: lpips (B, E), exits (B,) -> (B,); backbone = 0."""
  lpips = np.asarray(lpips, np.float64)
  exits = np.asarray(exits)
  if lpips.ndim != 2 or exits.shape != lpips.shape[:1]:
    raise ValueError(f'lpips has shape {lpips.shape} and exits {exits.shape}: expected (B, E) '
                     'and (B,)')
  if exits.size and (exits.min() < 0 or exits.max() > lpips.shape[1]):
    raise ValueError(f'exits range [{exits.min()}, {exits.max()}]: expected indices in '
                     f'[0, {lpips.shape[1]}]')
  full = np.concatenate([lpips, np.zeros((lpips.shape[0], 1))], axis=1)
  return full[np.arange(len(exits)), exits]


def violation_rate(true_of_chosen: Array, threshold: float) -> float:
  """Share of outputs whose true LPIPS exceeds the threshold."""
  _check_threshold(threshold)
  v = np.asarray(true_of_chosen, np.float64)
  if v.ndim != 1 or v.size == 0:
    raise ValueError(f'true_of_chosen has shape {v.shape}: expected (B,) with B >= 1')
  return float(np.mean(v > threshold))


# ---------------------------------------------------------------------------------------------
# Calibration: conformal risk control over one scalar offset per threshold.


def _route_order(costs: np.ndarray) -> np.ndarray:
  """Branch exits that can be chosen, in the order the rule tries them (cost, then index)."""
  order = np.argsort(costs, kind='stable')
  num_exits = len(costs) - 1
  return order[:int(np.nonzero(order == num_exits)[0][0])]  # exits after the backbone never run


def _checked_arrays(pred, true, costs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """float64 copies of (pred, true, costs) after the shape and value checks."""
  pred = np.asarray(pred, np.float64)
  true = np.asarray(true, np.float64)
  costs = np.asarray(costs, np.float64)
  _check_pair(pred, true)
  _check_pred_costs(pred.shape, costs.shape)
  _check_costs_values(costs)
  return pred, true, costs


def violation_scores(pred: Array, true: Array, threshold: float, costs: Array) -> np.ndarray:
  """Per-input conformity score U_i for `conformal_offset` (N,).

  With the offset rule (exit e allowed iff pred_e + lam <= t), input i's output violates
  (true LPIPS of the chosen exit > t) for some lam' >= lam iff lam <= U_i, where
  U_i = max{t - pred_ie : e violates (true_ie > t) and e is chosen for some lam}
  (-inf if no such e). 1[lam <= U_i] is the monotone (in lam) upper envelope of the violation
  indicator: exit e is chosen exactly for lam in (t - min_{cheaper e'} pred_e', t - pred_e].
  """
  pred, true, costs = _checked_arrays(pred, true, costs)
  _check_threshold(threshold)
  order = _route_order(costs)
  scores = np.full(pred.shape[0], -np.inf)
  if len(order) == 0:
    return scores
  p, y = pred[:, order], true[:, order]
  cheaper_min = np.concatenate(
      [np.full((p.shape[0], 1), np.inf), np.minimum.accumulate(p, axis=1)[:, :-1]], axis=1)
  reachable = p < cheaper_min
  bad = reachable & (y > threshold)
  cand = np.where(bad, threshold - p, -np.inf)
  return np.max(cand, axis=1)


def conformal_offset(pred_cal: Array, true_cal: Array, threshold: float, alpha: float,
                     costs: Array) -> float:
  """Offset lam for `choose_exit(pred, threshold, costs, offset=lam)` bounding violations.

  Guarantee (split conformal / conformal risk control, Angelopoulos et al. 2022): if the N
  calibration rows (pred_cal, true_cal) and a test row are exchangeable (e.g. i.i.d. draws of
  inputs from the same distribution, predictor trained on other data), then
      P(true LPIPS of the exit the test input is routed to > threshold) <= alpha,
  marginally over the calibration draw and the test input; averaged over a test set, the
  realised violation rate is <= alpha in expectation (a single finite test set fluctuates
  around it by ~sqrt(alpha (1 - alpha) / n_test)). It is NOT a conditional guarantee per
  exit or per input, and it holds for this one threshold (call once per threshold).

  Construction: lam = the ceil((N+1)(1-alpha))-th smallest `violation_scores` (+1e-6 rounding
  guard); a test violation implies U_test >= lam > that order statistic, which has probability
  <= alpha by exchangeability. lam = +inf (everything to the backbone) when N < 1/alpha - 1;
  lam = -inf (every input may take the cheapest exit) when too few calibration inputs can
  violate at all. lam may be negative: the paper's rule (lam = 0) is then needlessly cautious.
  One scalar per threshold is tighter than per-exit Bonferroni offsets (alpha / E each).
  """
  _check_alpha(alpha)
  scores = violation_scores(pred_cal, true_cal, threshold, costs)
  n = scores.shape[0]
  rank = math.ceil((n + 1) * (1 - alpha))
  if rank > n:
    return math.inf
  u = float(np.sort(scores)[rank - 1])
  return u + _ROUNDING_GUARD if math.isfinite(u) else u


def calibration_split(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Random (calibration_idx, test_idx) split of n rows; `fraction` of them for calibration."""
  if not 0 < fraction < 1:
    raise ValueError(f'fraction={fraction!r}: expected a calibration share in (0, 1)')
  n_cal = int(round(n * fraction))
  if n_cal < 1 or n_cal >= n:
    raise ValueError(f'n={n} with fraction={fraction}: expected at least one calibration and one '
                     'test row')
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[:n_cal]), np.sort(perm[n_cal:])


# ---------------------------------------------------------------------------------------------
# Report helpers (Fig. 3 / Fig. 7 style sweeps, Sec. 3.4 saving metric).


def sweep_rows(pred: Array, true: Array, costs: Array, thresholds: Sequence[float],
               alpha: float | None = None, pred_cal: Array | None = None,
               true_cal: Array | None = None,
               offset_fn: Callable[[float], float] | None = None) -> list[dict[str, Any]]:
  """One dict per threshold for a test set: exit histogram, mean GMACs, mean true LPIPS,
  violation rate and saved GMACs per LPIPS (Sec. 3.4), uncalibrated and calibrated
  (`calibrated_*` keys + `offset`): by `offset_fn(threshold)` when given (any rule, e.g.
  `core.calibration.offset`), else, when `alpha` and a calibration split are given, by
  `conformal_offset`.
  """
  pred, true, costs = _checked_arrays(pred, true, costs)
  if offset_fn is None and alpha is not None:
    if pred_cal is None or true_cal is None:
      raise ValueError('alpha given without pred_cal/true_cal: expected a calibration split')
    _check_alpha(alpha)
    offset_fn = lambda t: conformal_offset(pred_cal, true_cal, t, alpha, costs)  # noqa: E731
  num_routes = costs.shape[0]
  rows = []
  for t in thresholds:
    _check_threshold(t)
    row: dict[str, Any] = {'threshold': float(t)}
    variants = [('', 0.0)]
    if offset_fn is not None:
      lam = float(offset_fn(t))
      row['offset'] = lam
      if alpha is not None:
        row['alpha'] = float(alpha)
      variants.append(('calibrated_', lam))
    for prefix, lam in variants:
      exits = np.asarray(choose_exit(pred, t, costs, offset=lam))
      got = chosen_lpips(true, exits)
      mean_cost = float(costs[exits].mean())
      mean_lpips = float(got.mean())
      row[prefix + 'exit_counts'] = np.bincount(exits, minlength=num_routes).tolist()
      row[prefix + 'mean_gmacs'] = mean_cost
      row[prefix + 'mean_true_lpips'] = mean_lpips
      row[prefix + 'violation_rate'] = violation_rate(got, t)
      saved = float(costs[-1]) - mean_cost
      row[prefix + 'saved_gmacs_per_lpips'] = saved / mean_lpips if mean_lpips > 0 else math.nan
    rows.append(row)
  return rows


# ---------------------------------------------------------------------------------------------
# Single-input path, all inside jit.


def switch_apply(exit_fns: Sequence[Callable[..., Any]], index: Array, *operands: Any) -> Any:
  """`lax.switch(index, exit_fns, *operands)`: with a scalar index only the chosen branch runs.

  Every branch must return the same pytree of shapes/dtypes. Under `vmap` with a batched
  index this turns into `select` over all branches (every branch computed): batch with
  `run_bucketed` instead. An index out of range is clamped (lax.switch semantics).
  """
  if len(exit_fns) == 0:
    raise ValueError('exit_fns is empty: expected one function per exit')
  index = jnp.asarray(index)
  if index.ndim != 0:
    raise ValueError(f'index has shape {index.shape}: expected a scalar exit index '
                     '(batches go through run_bucketed)')
  return jax.lax.switch(index.astype(jnp.int32), list(exit_fns), *operands)


def routed_apply(prefix_fn: Callable[[PyTree, Array], Any],
                 predict_fn: Callable[[PyTree, Any], Array],
                 exit_fns: Sequence[Callable[[PyTree, Any], Any]],
                 params: PyTree, x: Any, threshold: Array, costs: Array,
                 offset: Array = 0.0) -> tuple[Any, dict[str, jax.Array]]:
  """One input end to end: prefix_fn -> predict_fn -> choose_exit -> switch over exits.

  prefix_fn(params, x) -> feats (the backbone up to the first branch point, bank retrieval
  included); predict_fn(params, feats) -> pred (E,); exit_fns[e](params, feats) -> output for
  e in [0, E] (E = rest of the backbone). Jit with the three callables static, e.g.
  `jax.jit(routed_apply, static_argnums=(0, 1, 2))` with `exit_fns` a tuple; params stay a
  jit argument. Returns (output, {'exit': index, 'pred_lpips': pred}).
  """
  if len(exit_fns) != jnp.shape(costs)[0]:
    raise ValueError(f'{len(exit_fns)} exit_fns and costs of shape {jnp.shape(costs)}: expected '
                     'one function per exit, the backbone last')
  feats = prefix_fn(params, x)
  pred = predict_fn(params, feats)
  index = choose_exit(pred, threshold, costs, offset)
  out = switch_apply(exit_fns, index, params, feats)
  return out, {'exit': index, 'pred_lpips': pred}


# ---------------------------------------------------------------------------------------------
# Batched path: bucket by exit on the host.


def _bucket_chunks(count: int, bucket_sizes: Sequence[int]) -> list[tuple[int, int]]:
  """Split `count` rows into (rows, padded_size) chunks with sizes from bucket_sizes: greedily
  the largest bucket that the remaining rows fill, so only a tail smaller than the smallest
  bucket is padded. (Padding a group to the next bucket instead wastes up to half a batch:
  23 rows padded to 32 made routed inference slower than the backbone in the demo sweep.)"""
  chunks, left = [], count
  while left >= bucket_sizes[0]:
    b = max(s for s in bucket_sizes if s <= left)
    chunks.append((b, b))
    left -= b
  if left:
    chunks.append((left, bucket_sizes[0]))
  return chunks


def _check_bucket_sizes(bucket_sizes: Sequence[int]) -> tuple[int, ...]:
  sizes = tuple(int(b) for b in bucket_sizes)
  if not sizes or sizes[0] < 1 or list(sizes) != sorted(set(sizes)):
    raise ValueError(f'bucket_sizes={tuple(bucket_sizes)}: expected strictly increasing '
                     'positive ints')
  return sizes


def bucket_plan(exits: Array, num_routes: int, bucket_sizes: Sequence[int] = (1, 4, 16, 64)
                ) -> tuple[list[tuple[int, np.ndarray]], np.ndarray]:
  """Host-side plan of a bucketed batch: (chunks, positions).

  chunks: [(route e, gather (b,) int32 row indices)], b a bucket size; rows routed to e are
  cut by `_bucket_chunks` (largest bucket first; only a tail below the smallest bucket is
  padded, repeating its last row). positions (B,) int32: where row i's output sits in the
  concatenation of the chunks' outputs, so `concatenate(outputs)[positions]` is the batch in
  its original order (one gather; padding rows are never picked)."""
  sizes = _check_bucket_sizes(bucket_sizes)
  exits = np.asarray(exits)
  if exits.ndim != 1:
    raise ValueError(f'exits has shape {exits.shape}: expected (B,)')
  if not np.issubdtype(exits.dtype, np.integer) or (
      exits.size and (exits.min() < 0 or exits.max() >= num_routes)):
    raise ValueError(f'exits (dtype {exits.dtype}, values {np.unique(exits).tolist()}): '
                     f'expected ints in [0, {num_routes - 1}]')
  chunks: list[tuple[int, np.ndarray]] = []
  positions = np.zeros(exits.shape[0], np.int32)
  offset = 0
  for e in np.unique(exits):
    rows = np.nonzero(exits == e)[0]
    start = 0
    for count, padded in _bucket_chunks(len(rows), sizes):
      idx = rows[start:start + count]
      start += count
      chunks.append((int(e), np.concatenate([idx, np.full(padded - count, idx[-1])]
                                            ).astype(np.int32)))
      positions[idx] = offset + np.arange(count)
      offset += padded
  return chunks, positions


def assemble(outputs: Sequence[PyTree], positions: Array) -> PyTree:
  """The chunks' outputs (in `bucket_plan` order) back in the batch's order: one
  concatenation and one gather per output leaf. Jittable."""
  return jax.tree_util.tree_map(lambda *o: jnp.concatenate(o)[positions], *outputs)


def run_bucketed(exit_fns: Sequence[Callable[[PyTree], PyTree]], exits: Array, inputs: PyTree,
                 bucket_sizes: Sequence[int] = (1, 4, 16, 64)) -> PyTree:
  """Run exit_fns[exits[i]] on row i of `inputs`; outputs in the original order.

  exit_fns[e](batch) -> pytree with leading batch axis; pass jitted functions (bind params
  with functools.partial so they stay jit arguments). `bucket_plan` cuts each exit's rows
  into chunks of the bucket sizes; each chunk is gathered, run, and the outputs are put back
  in order once (`assemble`). So each exit function sees at most len(bucket_sizes) distinct
  batch shapes, and an exit that no row needs is never called. Rows must not interact inside
  an exit function (eval-mode norms), else padding would change results. (The engine's
  batched path, `infer.engine.Engine.routed_batch`, gathers rows of the shared prefix inside
  its jitted routes instead of the raw inputs.)
  """
  _check_bucket_sizes(bucket_sizes)
  exits = np.asarray(exits)
  leaves = jax.tree_util.tree_leaves(inputs)
  if exits.ndim != 1 or not leaves or any(jnp.shape(a)[:1] != exits.shape for a in leaves):
    raise ValueError(f'exits has shape {exits.shape} and input leaves '
                     f'{[jnp.shape(a) for a in leaves]}: expected exits (B,) and every input '
                     'leaf with leading axis B')
  chunks, positions = bucket_plan(exits, len(exit_fns), bucket_sizes)
  outs = [exit_fns[e](jax.tree_util.tree_map(lambda a, g=gather: a[g], inputs))
          for e, gather in chunks]
  return assemble(outs, positions)


# ---------------------------------------------------------------------------------------------
# Compute-budget mode.


def _budget_greedy(pred: Array, costs: Array,
                   mean_budget: float) -> tuple[np.ndarray, float, float]:
  """Greedy on per-input lower convex hulls; returns (exits, lp_lower_bound, max_edge_gain).

  Multiple-choice knapsack: start every input at its cheapest route, then take hull upgrades
  in order of LPIPS saved per GMAC. The LP relaxation takes the same upgrades up to the first
  that does not fit, plus a fraction of it; so mean LPIPS(greedy) - optimum <=
  mean LPIPS(greedy) - LP bound <= (largest single upgrade's LPIPS gain) / B.
  """
  pred = np.asarray(pred, np.float64)
  costs = np.asarray(costs, np.float64)
  if pred.ndim != 2:
    raise ValueError(f'pred has shape {pred.shape}: expected (B, E)')
  _check_pred_costs(pred.shape, costs.shape)
  _check_costs_values(costs)
  if pred.shape[0] == 0 or not np.all(np.isfinite(pred)):
    raise ValueError(f'pred has shape {pred.shape}: expected B >= 1 rows of finite LPIPS')
  mb = float(mean_budget)
  cheapest = float(costs.min())
  if not math.isfinite(mb) or mb < cheapest:
    raise ValueError(f'mean_budget={mean_budget!r} GMACs: expected >= {cheapest} (every input '
                     'at the cheapest route)')
  batch = pred.shape[0]
  full = np.concatenate([pred, np.zeros((batch, 1))], axis=1)
  order = np.lexsort((np.arange(len(costs)), costs))  # by cost, then index
  exits = np.empty(batch, np.int64)
  edges = []  # (-efficiency, input, step, to_exit, d_cost, d_lpips)
  for i in range(batch):
    # Lower-left convex hull of (cost, lpips), starting at the best cheapest option.
    hull: list[int] = []
    for j in order:
      if hull and costs[j] == costs[hull[-1]]:
        if full[i, j] < full[i, hull[-1]]:
          hull.pop()
        else:
          continue
      if hull and full[i, j] >= full[i, hull[-1]]:
        continue  # dominated: costs more, no better
      while len(hull) >= 2:
        a, b = hull[-2], hull[-1]
        cross = ((costs[b] - costs[a]) * (full[i, j] - full[i, a]) -
                 (full[i, b] - full[i, a]) * (costs[j] - costs[a]))
        if cross <= 0:  # b is not below the segment a-j
          hull.pop()
        else:
          break
      hull.append(j)
    exits[i] = hull[0]
    for step in range(1, len(hull)):
      a, b = hull[step - 1], hull[step]
      dc, dl = costs[b] - costs[a], full[i, b] - full[i, a]
      edges.append((dl / dc, i, step, b, dc, dl))
  edges.sort(key=lambda r: (r[0], r[1], r[2]))  # most LPIPS saved per GMAC first
  left = mb * batch - float(costs[exits].sum())
  tol = 1e-9 * max(1.0, mb * batch)
  lp_value = float(full[np.arange(batch), exits].sum())
  lp_open = True
  max_gain = max((-r[5] for r in edges), default=0.0)
  blocked = np.zeros(batch, bool)
  for _, i, _, b, dc, dl in edges:
    if lp_open:
      if dc <= left + tol:
        lp_value += dl
      else:
        lp_value += dl * max(left, 0.0) / dc
        lp_open = False
    if blocked[i]:
      continue
    if dc <= left + tol:
      exits[i] = b
      left -= dc
    else:
      blocked[i] = True
  return exits, lp_value / batch, max_gain / batch


def budget_exits(pred: Array, costs: Array, mean_budget: float) -> np.ndarray:
  """Per-input exits minimising mean predicted LPIPS with mean GMACs <= mean_budget.

  pred (B, E) (the backbone's predicted LPIPS is 0), costs (E+1,). Greedy on convex hulls of
  the multiple-choice knapsack; its mean predicted LPIPS is within (largest single hull
  upgrade's LPIPS gain) / B of the optimum (see `_budget_greedy`), so it tends to the optimum
  as the batch grows. Host-side numpy; feed the result to `run_bucketed`.
  """
  exits, _, _ = _budget_greedy(pred, costs, mean_budget)
  return exits

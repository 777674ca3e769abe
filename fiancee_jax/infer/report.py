"""Figures + markdown report of a threshold sweep (`infer.py --sweep`), like the paper's
Figs. 3, 4, 8, 9 and Tables S3 / S4 (OASIS) or Figs. 5, 6, 7, 10 and Table S6 (head avatars),
plus what the paper does not show: the realised violation rate, and measured wall-clock
latency of every route and of routed batched inference.

`write(out_dir, result)` takes the dict built by `infer.sweep.sweep` (its 'kind', declared by
the adapter's `infer_inputs().report_kind`, picks the figure names and the wording; a
'rotation' entry adds Fig. 10, 'samples' with 'inputs' columns the Fig. 5 layout) and
writes report.md, summary.json, sweep.json and the figures (`figures(kind)`) into `out_dir`,
each file atomically (`io_utils.atomic_write`). summary.json is removed first and written
last: when it exists, every other file is complete and from the same sweep (a killed write
leaves no summary.json, and `make demo` reruns the sweep).
"""
from __future__ import annotations

import io
import json
import math
import os
from typing import Any

import numpy as np

from fiancee_jax.data.common import colorize
from fiancee_jax.io_utils import atomic_write
from fiancee_jax.train import logging as tlog

# Figure files by role, per report kind; the paper numbers them differently for its two
# experiments (semantic synthesis: 'oasis'; head avatars: 'heads').
_FIGURE_NAMES = {
    'oasis': {'exits_gmacs': 'fig3_exits_gmacs.png', 'quality_compute': 'fig4_quality_compute.png',
              'lpips_per_exit': 'fig8_lpips_per_exit.png',
              'single_vs_routed': 'fig9_single_vs_routed.png'},
    'heads': {'exits_gmacs': 'fig7_exits_gmacs.png', 'quality_compute': 'fig6_quality_compute.png',
              'lpips_per_exit': 'lpips_per_exit.png', 'single_vs_routed': 'single_vs_routed.png',
              'rotation': 'fig10_exits_vs_rotation.png',
              'key_angle': 'fig10_lpips_vs_key_angle.png'},
}
_ROTATION_ROLES = ('rotation', 'key_angle')   # drawn from res['rotation'] (Fig. 10)
_COMMON_FIGURES = {'violation': 'violation_rate.png', 'latency': 'latency.png',
                   'samples': 'samples.png'}

# What differs in the report's wording.
_TEXT = {
    'oasis': {'inputs': 'held-out maps, new noises', 'paper_exits': 'Fig. 3',
              'paper_quality': 'Fig. 4 uses FID; here mean LPIPS vs the backbone',
              'prefix': 'The backbone prefix (first conv + ResBlock 1), which the routed call '
                        'runs once and the chosen route continues from, alone',
              'predictor': 'prefix + predictor', 'eval': 'Tables S3 / S4',
              'sample_inputs': 'Label'},
    'heads': {'inputs': '(source, driver) pairs of the test split, the driver of another '
                        'identity where the split has several',
              'paper_exits': 'Fig. 7', 'paper_quality': 'Fig. 6',
              'prefix': 'Route functions each run the front end (appearance + motion '
                        'encoders, fusion; the predictor needs only the motion encoder)',
              'predictor': 'motion encoder + predictor', 'eval': 'Table S6',
              'sample_inputs': 'Source | driver | bank frame (Fig. 5)'},
}


def figures(kind: str = 'oasis') -> tuple[str, ...]:
  """File names of the figures `write` makes for a sweep of this kind ('oasis' | 'heads')."""
  if kind not in _FIGURE_NAMES:
    raise ValueError(f'report kind {kind!r}: expected one of {sorted(_FIGURE_NAMES)}')
  return tuple(_FIGURE_NAMES[kind].values()) + tuple(_COMMON_FIGURES.values())


FIGURES = figures('oasis')
HEADS_FIGURES = figures('heads')


def _save(fig, path: str) -> None:
  import matplotlib.pyplot as plt  # noqa: PLC0415
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110, bbox_inches='tight')
  plt.close(fig)
  atomic_write(path, buf.getvalue())


def _plt():
  import matplotlib  # noqa: PLC0415
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def _route_names(exits: list[int]) -> list[str]:
  return [f'exit {k}' for k in exits] + ['backbone']


def _density(ax, values, label, color=None, ls='-'):
  """Histogram-shaped density line (KDE when scipy can fit one)."""
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  if v.size == 0:
    return
  lo, hi = float(v.min()), float(v.max())
  grid = np.linspace(max(lo - 0.05, 0.0), hi + 0.05, 200)
  try:
    from scipy.stats import gaussian_kde  # noqa: PLC0415
    if v.size < 3 or np.ptp(v) <= 0:
      raise ValueError
    ax.plot(grid, gaussian_kde(v)(grid), color=color, ls=ls, label=label)
  except (ValueError, np.linalg.LinAlgError):
    ax.hist(v, bins=10, density=True, histtype='step', color=color, ls=ls, label=label)


def fig3(path: str, res: dict[str, Any]) -> None:
  """Exit distribution and mean GMACs vs threshold (Fig. 3; heads: Fig. 7), paper rule and
  calibrated."""
  plt = _plt()
  rows, names = res['rows'], _route_names(res['exits'])
  ts = [r['threshold'] for r in rows]
  label = res.get('rule_label', f'conformal, alpha={res["alpha"]}')
  variants = [('', 'paper rule')] + ([('calibrated_', label)]
                                     if 'calibrated_exit_counts' in rows[0] else [])
  fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 4), squeeze=False)
  x = np.arange(len(ts))
  for ax, (pre, title) in zip(axes[0], variants):
    counts = np.array([r[pre + 'exit_counts'] for r in rows], np.float64)
    share = counts / counts.sum(1, keepdims=True)
    bottom = np.zeros(len(ts))
    for e, name in enumerate(names):
      ax.bar(x, share[:, e], bottom=bottom, label=name)
      bottom += share[:, e]
    ax.set_xticks(x, [f'{t:g}' for t in ts])
    ax.set_xlabel('LPIPS threshold')
    ax.set_ylabel('share of inputs')
    ax.set_title(title)
    ax2 = ax.twinx()
    ax2.plot(x, [r[pre + 'mean_gmacs'] for r in rows], 'k-o', label='mean GMACs')
    ax2.set_ylabel('mean GMACs')
    ax2.set_ylim(0, res['costs'][-1] * 1.05)
    ax.legend(loc='lower left', fontsize=7)
  _save(fig, path)


def fig4(path: str, res: dict[str, Any]) -> None:
  """Quality vs compute of every route (Fig. 4 uses FID; here mean LPIPS vs the backbone;
  heads: Fig. 6)."""
  plt = _plt()
  true = np.asarray(res['true'])
  costs = res['costs']
  fig, ax = plt.subplots(figsize=(5, 4))
  means = list(np.mean(true, 0)) + [0.0]
  ax.plot(costs, means, 'o-')
  for name, c, m in zip(_route_names(res['exits']), costs, means):
    ax.annotate(name, (c, m), textcoords='offset points', xytext=(4, 4), fontsize=8)
  ax.set_xlabel('GMACs per image')
  ax.set_ylabel('mean LPIPS vs backbone (test)')
  ax.set_title('quality vs compute per route')
  _save(fig, path)


def fig8(path: str, res: dict[str, Any]) -> None:
  """LPIPS distribution of every exit, with the bank and (when given) without (Fig. 8)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  true = np.asarray(res['true'])
  nob = res.get('true_nobank')
  for e, k in enumerate(res['exits']):
    _density(ax, true[:, e], f'exit {k} (bank)', colors[e % len(colors)])
    if nob is not None:
      _density(ax, np.asarray(nob)[:, e], f'exit {k} (no bank)', colors[e % len(colors)], '--')
  ax.set_xlabel('LPIPS vs backbone')
  ax.set_ylabel('density')
  ax.set_title('per-exit LPIPS' + ('' if nob is not None else
                                   ' (bank only: no checkpoints/branches_nobank)'))
  ax.legend(fontsize=7)
  _save(fig, path)


def fig9(path: str, res: dict[str, Any]) -> None:
  """Each exit alone vs the predictor enforcing that exit's mean LPIPS (Fig. 9)."""
  plt = _plt()
  items = res['fig9']
  fig, axes = plt.subplots(1, max(len(items), 1), figsize=(4 * max(len(items), 1), 3.2),
                           squeeze=False)
  for ax, it in zip(axes[0], items):
    _density(ax, it['single'], f'exit {it["exit"]} alone')
    _density(ax, it['routed'], f'P, t={it["threshold"]:.3f}', ls='--')
    ax.axvline(it['threshold'], color='gray', lw=0.8)
    ax.set_xlabel('LPIPS vs backbone')
    ax.legend(fontsize=7)
  _save(fig, path)


def fig_violation(path: str, res: dict[str, Any]) -> None:
  plt = _plt()
  rows = res['rows']
  ts = [r['threshold'] for r in rows]
  fig, ax = plt.subplots(figsize=(5, 4))
  ax.plot(ts, [r['violation_rate'] for r in rows], 'o-', label='paper rule')
  if 'calibrated_violation_rate' in rows[0]:
    ax.plot(ts, [r['calibrated_violation_rate'] for r in rows], 's-',
            label=res.get('rule_label', 'conformal offset'))
    if res.get('alpha') is not None:
      ax.axhline(res['alpha'], color='gray', ls='--', label=f'alpha = {res["alpha"]}')
  ax.set_xlabel('LPIPS threshold')
  ax.set_ylabel('share of test outputs above the threshold')
  ax.set_ylim(0, 1)
  ax.legend()
  _save(fig, path)


def fig_latency(path: str, res: dict[str, Any]) -> None:
  plt = _plt()
  lat = res['latency']
  names = _route_names(res['exits'])
  fig, ax = plt.subplots(figsize=(6, 4))
  vals = list(lat['per_route_ms_per_image']) + [lat['routed_ms_per_image']]
  ax.bar(names + ['routed'], vals, color=['C0'] * len(names) + ['C3'])
  ax.set_ylabel(f'ms per image (batch {lat["batch_size"]}, median of {lat["repeats"]})')
  ax.set_title(f'wall-clock; routed x{lat["speedup"]:.2f} vs backbone')
  ax.tick_params(axis='x', labelrotation=30)
  _save(fig, path)


def _rotation_arrays(res: dict[str, Any]) -> tuple[dict, list[str], np.ndarray, np.ndarray]:
  """(rotation dict, route names, driver rotation (N,) degrees, route taken (N,))."""
  rot = res['rotation']
  return (rot, _route_names(res['exits']), np.asarray(rot['driver_angle'], np.float64),
          np.asarray(rot['exits_taken']))


def fig10_rotation(path: str, res: dict[str, Any]) -> None:
  """Head avatars (Fig. 10): how many test inputs each route took, against the driver's
  head rotation from frontal (stacked histogram, at the headline threshold)."""
  plt = _plt()
  rot, names, angle, taken = _rotation_arrays(res)
  fig, ax = plt.subplots(figsize=(6, 4))
  bins = np.linspace(0.0, max(float(angle.max()), 1.0) * 1.001, 9)
  ax.hist([angle[taken == e] for e in range(len(names))], bins=bins, stacked=True,
          label=names)
  ax.set_xlabel(f'driver head rotation from frontal, degrees ({rot["angle_source"]})')
  ax.set_ylabel('test inputs')
  ax.set_title(f'routes vs head rotation (threshold {rot["threshold"]:g}, calibrated)')
  ax.legend(fontsize=7)
  _save(fig, path)


def _key_axis(res: dict[str, Any]) -> tuple[np.ndarray, str]:
  rot = res['rotation']
  if rot.get('key_angle') is not None:
    return (np.asarray(rot['key_angle'], np.float64),
            "angle between the driver's key and the guiding bank frame's, degrees")
  return (np.asarray(rot['driver_angle'], np.float64),
          f'driver head rotation, degrees ({rot["angle_source"]}; unguided: no bank)')


def fig10_key_angle(path: str, res: dict[str, Any]) -> None:
  """Head avatars (Fig. 10, Sec. 6): each exit's true LPIPS against the angle between the
  driver's key and the nearest bank key (the guiding frame), with binned means."""
  plt = _plt()
  x, label = _key_axis(res)
  true = np.asarray(res['true'], np.float64)
  fig, ax = plt.subplots(figsize=(6, 4))
  edges = np.quantile(x, np.linspace(0, 1, 5)) if x.size > 1 else np.array([0.0, 1.0])
  which = np.clip(np.searchsorted(edges, x, side='right') - 1, 0, len(edges) - 2)
  for e, k in enumerate(res['exits']):
    color = f'C{e}'
    ax.scatter(x, true[:, e], s=8, alpha=0.4, color=color)
    mids = [(x[which == b].mean(), true[which == b, e].mean())
            for b in range(len(edges) - 1) if np.any(which == b)]
    ax.plot(*zip(*mids), '-o', color=color, label=f'exit {k} (binned mean)')
  ax.set_xlabel(label)
  ax.set_ylabel('LPIPS vs backbone (test)')
  ax.legend(fontsize=7)
  _save(fig, path)


def samples_png(path: str, res: dict[str, Any]) -> None:
  """OASIS: label | exits | backbone | routed. Heads (Fig. 5): source | driver | bank frame |
  backbone | exits | routed."""
  s = res['samples']
  heads = 'inputs' in s
  routes = [s['exits'][-1]] + list(s['exits'][:-1]) if heads else list(s['exits'])
  rows = []
  for i in range(len(s['routed'])):
    if heads:
      cols = [tlog.to_uint8(x[i]) for _, x in s['inputs']]
    else:
      cols = [colorize(np.asarray(s['labels'][i]))]
    cols += [tlog.to_uint8(x[i]) for x in routes]
    cols.append(tlog.to_uint8(s['routed'][i]))
    rows.append(np.concatenate(cols, axis=1))
  tlog.write_png(path, np.concatenate(rows, axis=0))


def _fmt(v: Any, nd: int = 3) -> str:
  if isinstance(v, float):
    return ('+inf' if v > 0 else '-inf') if math.isinf(v) else f'{v:.{nd}f}'
  return str(v)


def _kind(res: dict[str, Any]) -> str:
  """The result's report kind (declared by the adapter; 'oasis' when a result has none)."""
  kind = res.get('kind', 'oasis')
  if kind not in _FIGURE_NAMES:
    raise ValueError(f'report kind {kind!r}: expected one of {sorted(_FIGURE_NAMES)}')
  return kind


def _figure_names(res: dict[str, Any]) -> dict[str, str]:
  """{role: file} of the figures this result has data for."""
  return {role: name for role, name in {**_FIGURE_NAMES[_kind(res)], **_COMMON_FIGURES}.items()
          if role not in _ROTATION_ROLES or res.get('rotation') is not None}


def _rotation_md(res: dict[str, Any], fig: dict[str, str]) -> list[str]:
  """Fig. 10 section (head avatars): routes vs rotation, LPIPS vs the key angle."""
  rot, names, angle, taken = _rotation_arrays(res)
  key = rot.get('key_angle')
  key = None if key is None else np.asarray(key, np.float64)
  lines = ['## Routes vs head rotation (Fig. 10)', '',
           f'Driver rotation from frontal: {rot["angle_source"]}; key angle: between the '
           "driver's motion-encoder angles and those of the bank frame retrieval picks (the "
           f'guiding frame). Routes at threshold {rot["threshold"]:g} (calibrated).', '',
           '| route | inputs | mean driver rotation (deg) | mean key angle (deg) |',
           '|---|---|---|---|']
  for e, name in enumerate(names):
    m = taken == e
    mean = lambda v: f'{v[m].mean():.1f}' if m.any() else '-'  # noqa: E731
    lines.append(f'| {name} | {int(m.sum())} | {mean(angle)} | '
                 f'{"-" if key is None else mean(key)} |')
  if key is not None and key.size > 2 and np.ptp(key) > 0:
    true = np.asarray(res['true'], np.float64)
    corr = [np.corrcoef(key, true[:, e])[0, 1] if np.ptp(true[:, e]) > 0 else math.nan
            for e in range(true.shape[1])]
    lines += ['', 'Pearson correlation of key angle and LPIPS: ' + ', '.join(
        f'exit {k} {_fmt(float(c), 2)}' for k, c in zip(res['exits'], corr)) + '.']
  lines += ['', f'![routes vs rotation]({fig["rotation"]}) '
            f'![LPIPS vs key angle]({fig["key_angle"]})', '']
  return lines


def _best_line(s: dict[str, Any]) -> list[str]:
  """The second headline: the largest threshold whose realised mean LPIPS <= the target."""
  b = s.get('best_mean_target')
  if not b or s.get('headline') != 'operating_point':
    return []
  return [f'Largest swept threshold with realised mean LPIPS <= {s["target_mean_lpips"]} '
          f'(same rule): {b["threshold"]:g}'
          + ('' if b['meets_target'] else ' (none met it; smallest shown)')
          + f': mean LPIPS {b["mean_lpips"]:.4f}, violation rate {b["violation_rate"]:.3f}, '
          f'GMACs share {b["gmacs_share"]:.3f}.', '']


def _cost_line(cost: dict[str, Any] | None) -> str:
  if not cost:
    return '.'
  return (f'; the routed call forced to {cost["forced_exit"]} {cost["routed_forced_ms"]:.3f} ms '
          f'vs the route alone {cost["route_alone_ms"]:.3f} ms (paired medians of '
          f'{cost["repeats"]}): routing adds {cost["share_of_cheapest"]:.1%}.')


def markdown(res: dict[str, Any]) -> str:
  s, lat = res['summary'], res['latency']
  kind = _kind(res)
  text, fig = _TEXT[kind], _FIGURE_NAMES[kind]
  names = _route_names(res['exits'])
  ob = lat['overhead_batch1']
  lines = [
      f'# FIANCEE sweep report: {s.get("config", "")}', '',
      f'Device: {s["device"]}. Test inputs: {s["num_test"]} ({text["inputs"]}).', '',
      '## Headline', '',
      f'At threshold **{s["threshold"]:g}** ({s.get("rule_description", s["rule"])}; '
      + (f'the paper\'s operating point, per-input LPIPS <= {s["threshold"]:g}'
         if s.get('headline') == 'operating_point' else
         f'the largest swept threshold whose realised mean LPIPS <= {s["target_mean_lpips"]}'
         + ('' if s['meets_target'] else ' — **none met it; smallest threshold shown**'))
      + '):', '',
      f'- mean LPIPS vs backbone: **{s["mean_lpips"]:.4f}**',
      f'- violation rate (LPIPS > threshold): **{s["violation_rate"]:.3f}**',
      f'- mean GMACs: {s["mean_gmacs"]:.3f} of {s["backbone_gmacs"]:.3f} -> share '
      f'**{s["gmacs_share"]:.3f}** (saved {1 - s["gmacs_share"]:.1%})',
      f'- wall-clock speed-up of routed batched inference over the backbone (same run, batch '
      f'{lat["batch_size"]}): **x{s["latency_speedup"]:.2f}**',
      f'- gain (Sec. 3.4, slope of mean GMACs vs realised LPIPS): '
      f'{_fmt(s["gain_gmacs_per_lpips"], 1)} GMACs/LPIPS',
      f'- routing overhead at batch 1 (the routed call made to take the cheapest route, '
      f'{ob["cheapest_route"]}, vs that route alone; the prefix is shared): '
      f'**{s["routing_overhead_share_of_cheapest"]:.1%}** of the route', '',
      f'Paper rule (offset 0) at threshold {s["paper_rule"]["threshold"]:g}: mean LPIPS '
      f'{s["paper_rule"]["mean_lpips"]:.4f}, violation rate '
      f'{s["paper_rule"]["violation_rate"]:.3f}, GMACs share '
      f'{s["paper_rule"]["gmacs_share"]:.3f}.', '', *_best_line(s),
      f'## Sweep (test split, {text["paper_exits"]})', '',
      '| threshold | offset | ' + ' | '.join(names) + ' | mean GMACs | mean LPIPS | violations '
      '| paper rule: GMACs | LPIPS | violations |',
      '|' + '---|' * (len(names) + 8)]
  for r in res['rows']:
    cnt = r.get('calibrated_exit_counts', r['exit_counts'])
    lines.append(
        f'| {r["threshold"]:g} | {_fmt(r.get("offset", 0.0), 4)} | '
        + ' | '.join(str(c) for c in cnt)
        + f' | {r.get("calibrated_mean_gmacs", r["mean_gmacs"]):.3f}'
        f' | {r.get("calibrated_mean_true_lpips", r["mean_true_lpips"]):.4f}'
        f' | {r.get("calibrated_violation_rate", r["violation_rate"]):.3f}'
        f' | {r["mean_gmacs"]:.3f} | {r["mean_true_lpips"]:.4f} | {r["violation_rate"]:.3f} |')
  lines += ['', f'![exits and GMACs vs threshold]({fig["exits_gmacs"]})',
            f'![violation rate]({_COMMON_FIGURES["violation"]})', '',
            f'## Routes ({text["paper_quality"]})', '',
            '| route | GMACs | mean LPIPS (test) | without the bank | ms / image (batched) |',
            '|---|---|---|---|---|']
  means = list(np.mean(np.asarray(res['true']), 0)) + [0.0]
  nob = res.get('true_nobank')  # the unguided ablation's exits on the same inputs (Fig. 8)
  nob = ['n/a'] * len(names) if nob is None else (
      [f'{m:.4f}' for m in np.mean(np.asarray(nob), 0)] + ['0.0000'])
  for name, c, m, m_nb, ms in zip(names, res['costs'], means, nob,
                                  lat['per_route_ms_per_image']):
    lines.append(f'| {name} | {c:.3f} | {m:.4f} | {m_nb} | {ms:.3f} |')
  parts = lat['routed_parts_ms_per_image']
  lines += [
      '', f'Routed: {lat["routed_ms_per_image"]:.3f} ms / image = {text["predictor"]} '
      f'{parts["prefix_and_predictor"]:.3f} + route calls {parts["routes"]:.3f} + host dispatch '
      f'{parts["host_dispatch"]:.3f}; backbone {lat["backbone_ms_per_image"]:.3f} ms / image. '
      f'{text["prefix"]}: {ob["prefix_ms"]:.3f} ms at batch 1.', '',
      f'Batch 1: cheapest route {ob["cheapest_route_ms"]:.3f} ms, {text["predictor"]} '
      f'{ob["prefix_and_predictor_ms"]:.3f} ms ({ob["predictor_share_of_cheapest"]:.1%}), '
      f'retrieval {max(ob["prefix_and_retrieval_ms"] - ob["prefix_ms"], 0):.3f} ms '
      f'({ob["retrieval_share_of_cheapest"]:.1%}; paper: ~16% on a P40)'
      + _cost_line(lat.get('routing_cost_batch1')), '',
      f'![quality vs compute]({fig["quality_compute"]}) '
      f'![latency]({_COMMON_FIGURES["latency"]})', '',
      '## Quality distributions', '',
      f'![per-exit LPIPS]({fig["lpips_per_exit"]})', '',
      'Each exit alone vs the predictor enforcing that exit\'s mean LPIPS (paper rule):', '',
      f'![single vs routed]({fig["single_vs_routed"]})', '']
  if res.get('rotation') is not None:
    lines += _rotation_md(res, fig)
  ev = res.get('predictor_eval')
  if ev:
    lines += [f'## Predictor error ({text["eval"]})', '', f'Definition: {ev["definition"]}.', '',
              '| split | ' + ' | '.join(f'B{k}' for k in ev['exits']) + ' | mean |',
              '|' + '---|' * (len(ev['exits']) + 2)]
    for split in ('validation', 'test', 'calibration'):
      if split in ev:
        lines.append(f'| {split} | ' + ' | '.join(f'{100 * v:.1f}%' for v in
                                                   ev[split]['rel_error'])
                     + f' | {100 * ev[split]["mean_rel_error"]:.1f}% |')
    lines.append('')
  routes = ['backbone'] + names[:-1] if 'inputs' in res['samples'] else names
  lines += ['## Samples', '', f'{text["sample_inputs"]} | ' + ' | '.join(routes) + ' | routed '
            f'(routes taken: {res["samples"]["routed_exit"]})', '',
            f'![samples]({_COMMON_FIGURES["samples"]})', '']
  return '\n'.join(lines)


def jsonable(x: Any) -> Any:
  """x with numpy scalars and arrays as Python values and non-finite floats as strings
  ('inf'): strict JSON."""
  if isinstance(x, dict):
    return {k: jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return jsonable(x.tolist())
  if isinstance(x, (np.floating, float)):
    v = float(x)
    return v if math.isfinite(v) else str(v)
  if isinstance(x, np.integer):
    return int(x)
  return x


def write(out_dir: str, res: dict[str, Any]) -> dict[str, str]:
  """Write every figure, report.md and summary.json (+ sweep.json with all rows).
  summary.json goes first and comes back last (the report's completion mark)."""
  names = _figure_names(res)
  os.makedirs(out_dir, exist_ok=True)
  p = lambda name: os.path.join(out_dir, name)
  if os.path.exists(p('summary.json')):
    os.remove(p('summary.json'))
  makers = {'exits_gmacs': fig3, 'quality_compute': fig4, 'lpips_per_exit': fig8,
            'single_vs_routed': fig9, 'rotation': fig10_rotation, 'key_angle': fig10_key_angle,
            'violation': fig_violation, 'latency': fig_latency, 'samples': samples_png}
  for role, name in names.items():
    makers[role](p(name), res)
  report = p('report.md')
  summary = dict(res['summary'], report=report)
  atomic_write(p('sweep.json'), json.dumps(jsonable(
      {'rows': res['rows'], 'latency': res['latency'], 'costs': res['costs'],
       'exits': res['exits'], 'rotation': res.get('rotation')}), indent=1))
  atomic_write(report, markdown(res))
  atomic_write(p('summary.json'), json.dumps(jsonable(summary), indent=1))
  return {'report': report, 'summary': p('summary.json'),
          **{name: p(name) for name in names.values()}}

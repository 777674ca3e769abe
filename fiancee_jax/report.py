"""Figures + markdown report of a threshold sweep (`infer.py --sweep`), like the paper's
Figs. 3, 4, 8, 9 and Tables S3 / S4, plus what the paper does not show: the realised violation
rate, and measured wall-clock latency of every route and of routed batched inference.

`write(out_dir, result)` takes the dict built by `infer_lib.sweep` and writes, atomically:
report.md, summary.json and fig_*.png / samples.png into `out_dir`.
"""
from __future__ import annotations

import io
import json
import math
import os
from typing import Any

import numpy as np

FIGURES = ('fig3_exits_gmacs.png', 'fig4_quality_compute.png', 'fig8_lpips_per_exit.png',
           'fig9_single_vs_routed.png', 'violation_rate.png', 'latency.png', 'samples.png')


def _atomic_bytes(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def _save(fig, path: str) -> None:
  import matplotlib.pyplot as plt  # noqa: PLC0415
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110, bbox_inches='tight')
  plt.close(fig)
  _atomic_bytes(path, buf.getvalue())


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
  """Exit distribution and mean GMACs vs threshold (Fig. 3), paper rule and calibrated."""
  plt = _plt()
  rows, names = res['rows'], _route_names(res['exits'])
  ts = [r['threshold'] for r in rows]
  variants = [('', 'paper rule')] + ([('calibrated_', f'conformal, alpha={res["alpha"]}')]
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
  """Quality vs compute of every route (Fig. 4 uses FID; here mean LPIPS vs the backbone)."""
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
                                   ' (no unguided run given: bank only)'))
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
    ax.plot(ts, [r['calibrated_violation_rate'] for r in rows], 's-', label='conformal offset')
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


def samples_png(path: str, res: dict[str, Any]) -> None:
  from fiancee_jax.data.common import colorize  # noqa: PLC0415
  from fiancee_jax.train import logging as tlog  # noqa: PLC0415
  s = res['samples']
  rows = []
  for i in range(len(s['labels'])):
    cols = [colorize(np.asarray(s['labels'][i]))]
    cols += [tlog.to_uint8(x[i]) for x in s['exits']]
    cols.append(tlog.to_uint8(s['routed'][i]))
    rows.append(np.concatenate(cols, axis=1))
  tlog.write_png(path, np.concatenate(rows, axis=0))


def _fmt(v: Any, nd: int = 3) -> str:
  if isinstance(v, float):
    return ('+inf' if v > 0 else '-inf') if math.isinf(v) else f'{v:.{nd}f}'
  return str(v)


def markdown(res: dict[str, Any]) -> str:
  s, lat = res['summary'], res['latency']
  names = _route_names(res['exits'])
  ob = lat['overhead_batch1']
  lines = [
      f'# FIANCEE sweep report: {s.get("config", "")}', '',
      f'Device: {s["device"]}. Test inputs: {s["num_test"]} (held-out maps, new noises).', '',
      '## Headline', '',
      f'At threshold **{s["threshold"]:g}** ({s["rule"]}; the largest swept threshold whose '
      f'realised mean LPIPS <= {s["target_mean_lpips"]}'
      + ('' if s['meets_target'] else ' — **none met it; smallest threshold shown**') + '):', '',
      f'- mean LPIPS vs backbone: **{s["mean_lpips"]:.4f}**',
      f'- violation rate (LPIPS > threshold): **{s["violation_rate"]:.3f}**',
      f'- mean GMACs: {s["mean_gmacs"]:.3f} of {s["backbone_gmacs"]:.3f} -> share '
      f'**{s["gmacs_share"]:.3f}** (saved {1 - s["gmacs_share"]:.1%})',
      f'- wall-clock speed-up of routed batched inference over the backbone (same run, batch '
      f'{lat["batch_size"]}): **x{s["latency_speedup"]:.2f}**',
      f'- gain (Sec. 3.4, slope of mean GMACs vs realised LPIPS): '
      f'{_fmt(s["gain_gmacs_per_lpips"], 1)} GMACs/LPIPS',
      f'- routing overhead (prefix + predictor + retrieval, batch 1) / cheapest route '
      f'({ob["cheapest_route"]}): **{s["routing_overhead_share_of_cheapest"]:.1%}**', '',
      f'Paper rule (offset 0) at its own threshold {s["paper_rule"]["threshold"]:g}: mean LPIPS '
      f'{s["paper_rule"]["mean_lpips"]:.4f}, violation rate '
      f'{s["paper_rule"]["violation_rate"]:.3f}, GMACs share '
      f'{s["paper_rule"]["gmacs_share"]:.3f}.', '',
      '## Sweep (test split)', '',
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
  lines += ['', '![exits and GMACs vs threshold](fig3_exits_gmacs.png)',
            '![violation rate](violation_rate.png)', '',
            '## Routes', '',
            '| route | GMACs | mean LPIPS (test) | ms / image (batched) |', '|---|---|---|---|']
  means = list(np.mean(np.asarray(res['true']), 0)) + [0.0]
  for name, c, m, ms in zip(names, res['costs'], means, lat['per_route_ms_per_image']):
    lines.append(f'| {name} | {c:.3f} | {m:.4f} | {ms:.3f} |')
  parts = lat['routed_parts_ms_per_image']
  lines += [
      '', f'Routed: {lat["routed_ms_per_image"]:.3f} ms / image = prefix + predictor '
      f'{parts["prefix_and_predictor"]:.3f} + route calls {parts["routes"]:.3f} + host dispatch '
      f'{parts["host_dispatch"]:.3f}; backbone {lat["backbone_ms_per_image"]:.3f} ms / image. '
      'Route functions recompute the backbone prefix (first conv + ResBlock 1) that the '
      f'predictor already ran: {ob["prefix_ms"]:.3f} ms at batch 1.', '',
      f'Batch 1: cheapest route {ob["cheapest_route_ms"]:.3f} ms, prefix + predictor '
      f'{ob["prefix_and_predictor_ms"]:.3f} ms ({ob["predictor_share_of_cheapest"]:.1%}), '
      f'retrieval {max(ob["prefix_and_retrieval_ms"] - ob["prefix_ms"], 0):.3f} ms '
      f'({ob["retrieval_share_of_cheapest"]:.1%}; paper: ~16% on a P40).', '',
      '![quality vs compute](fig4_quality_compute.png) ![latency](latency.png)', '',
      '## Quality distributions', '',
      '![per-exit LPIPS](fig8_lpips_per_exit.png)', '',
      'Each exit alone vs the predictor enforcing that exit\'s mean LPIPS (paper rule):', '',
      '![single vs routed](fig9_single_vs_routed.png)', '']
  ev = res.get('predictor_eval')
  if ev:
    lines += ['## Predictor error (Tables S3 / S4)', '', f'Definition: {ev["definition"]}.', '',
              '| split | ' + ' | '.join(f'B{k}' for k in ev['exits']) + ' | mean |',
              '|' + '---|' * (len(ev['exits']) + 2)]
    for split in ('validation', 'test', 'calibration'):
      if split in ev:
        lines.append(f'| {split} | ' + ' | '.join(f'{100 * v:.1f}%' for v in
                                                   ev[split]['rel_error'])
                     + f' | {100 * ev[split]["mean_rel_error"]:.1f}% |')
    lines.append('')
  lines += ['## Samples', '', 'Label | ' + ' | '.join(names) + ' | routed '
            f'(routes taken: {res["samples"]["routed_exit"]})', '', '![samples](samples.png)', '']
  return '\n'.join(lines)


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (np.floating, float)):
    v = float(x)
    return v if math.isfinite(v) else str(v)
  if isinstance(x, np.integer):
    return int(x)
  return x


def write(out_dir: str, res: dict[str, Any]) -> dict[str, str]:
  """Write every figure, report.md and summary.json (+ sweep.json with all rows)."""
  os.makedirs(out_dir, exist_ok=True)
  p = lambda name: os.path.join(out_dir, name)
  fig3(p(FIGURES[0]), res)
  fig4(p(FIGURES[1]), res)
  fig8(p(FIGURES[2]), res)
  fig9(p(FIGURES[3]), res)
  fig_violation(p(FIGURES[4]), res)
  fig_latency(p(FIGURES[5]), res)
  samples_png(p(FIGURES[6]), res)
  report = p('report.md')
  summary = dict(res['summary'], report=report)
  _atomic_bytes(p('sweep.json'), json.dumps(_jsonable(
      {'rows': res['rows'], 'latency': res['latency'], 'costs': res['costs'],
       'exits': res['exits']}), indent=1).encode())
  _atomic_bytes(p('summary.json'), json.dumps(_jsonable(summary), indent=1).encode())
  _atomic_bytes(report, markdown(res).encode())
  return {'report': report, 'summary': p('summary.json'),
          **{name: p(name) for name in FIGURES}}

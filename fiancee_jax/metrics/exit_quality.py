"""Per-route quality of a trained workdir, with and without the bank: the demo's Table S1 and
Fig. 8 (`bench/exit_quality.py` prints them).

For every route (exit 1..E, backbone) and both branch stages (`checkpoints/branches`,
`checkpoints/branches_nobank`):
  * FID vs the real images of the split, on `noises` generated images per map (the split's
    maps x `noises` noises: noise 0 is `BranchLosses.eval_rows`' fixed evaluation noise, noise
    j > 0 a fresh one per row, `fold_in(PRNGKey(seed), NOISE_TAG + j)`), against the split's
    real images (one per map);
  * mIoU of the workdir's segmenter (`metrics.segmenter`, trained on the real train images) on
    the same generated images against their input label maps (one confusion matrix per route);
  * LPIPS vs the backbone's image of the same input, per input, on the first `lpips_noises`
    noises (the Fig. 8 distributions); the mean is the table's;
  * GMACs of the route.
The backbone's image does not depend on the branches, so it is generated and scored once.
Each (stage, branch step, noise) pass is cached as an npz under `<cache_dir>` (keyed by the
backbone and branch steps, the split size and the segmenter's key), so a rerun or a run after
more branch steps only computes what changed.

The second route input must be a per-row noise vector (OASIS: (labels, noises)); the first, the
label maps the mIoU is scored against.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fiancee_jax import workdir as wd
from fiancee_jax.core import stages
from fiancee_jax.core.interface import Backbone
from fiancee_jax.errors import FianceeError
from fiancee_jax.io_utils import atomic_open
from fiancee_jax.metrics import segmenter as seg_lib
from fiancee_jax.train import checkpoint

NOISE_TAG = 0x51D0
_print = functools.partial(print, flush=True)


class ExitQualityError(FianceeError):
  """Inputs this evaluation cannot score."""


def noise_rows(config, inputs: tuple, j: int) -> tuple:
  """The route inputs with noise set j (0: the stage's own evaluation noises)."""
  if j == 0:
    return inputs
  z = np.asarray(inputs[1])
  if z.ndim != 2 or z.shape[0] != np.shape(inputs[0])[0]:
    raise ExitQualityError(f'exit quality: route input 1 has shape {z.shape}; expected a '
                           '(rows, z_dim) noise per row')
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), NOISE_TAG + j)
  fresh = np.asarray(jax.random.normal(key, z.shape), z.dtype)
  return (inputs[0], fresh, *inputs[2:])


def _save(path: str, arrays: dict[str, np.ndarray]) -> None:
  import io  # noqa: PLC0415
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with atomic_open(path) as f:
    f.write(buf.getvalue())


def _load(path: str) -> dict[str, np.ndarray] | None:
  if not os.path.exists(path):
    return None
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


class _Scorers:
  """Inception features, segmenter confusion, LPIPS, loaded once."""

  def __init__(self, segmenter: seg_lib.Segmenter):
    from fiancee_jax.metrics import fid as fid_lib  # noqa: PLC0415 (heavy: inception)
    from fiancee_jax.metrics import lpips as lpips_lib  # noqa: PLC0415
    self.seg = segmenter
    self.inception = fid_lib.load_inception()
    self.lpips = lpips_lib.load()
    self.fid = fid_lib.frechet_distance_features

  def feats(self, x: np.ndarray) -> np.ndarray:
    return np.asarray(self.inception(jnp.asarray(x)))

  def lp(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.asarray(self.lpips(jnp.asarray(x), jnp.asarray(y)))


def _pass(fn: Callable, params: Any, inputs: tuple, labels: np.ndarray, names: list[str],
          keys: list[Any], want: set[str], lpips_on: bool, sc: _Scorers, batch_size: int,
          log: Callable, tag: str) -> dict[str, np.ndarray]:
  """One sweep over the rows: for each route name in `want`, Inception features, the
  segmenter's confusion matrix and (lpips_on, exits only) per-row LPIPS vs the backbone."""
  n = len(labels)
  out: dict[str, list] = {}
  for s in range(0, n, batch_size):
    idx = np.arange(s, min(n, s + batch_size))
    pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
    imgs = fn(params, *(np.asarray(x)[pad] for x in inputs))
    ref = np.asarray(imgs['backbone'])[:len(idx)]
    for name, k in zip(names, keys):
      if name not in want:
        continue
      x = np.asarray(imgs[k])[:len(idx)]
      out.setdefault(f'{name}/feats', []).append(sc.feats(x))
      out.setdefault(f'{name}/cm', []).append(sc.seg.confusion(x, labels[idx])[None])
      if lpips_on and name != 'backbone':
        out.setdefault(f'{name}/lpips', []).append(sc.lp(x, ref))
    if (s // batch_size) % 10 == 0:
      log(f'exit quality {tag}: rows {s + len(idx)}/{n}')
  return {k: (np.sum(np.concatenate(v), 0) if k.endswith('/cm') else np.concatenate(v))
          for k, v in out.items()}


def evaluate(backbone: Backbone, workdir: str, segmenter: seg_lib.Segmenter, *,
             split: str = 'test', num: int | None = None, noises: int = 3,
             lpips_noises: int = 1, batch_size: int = 8, cache_dir: str | None = None,
             banks: tuple[bool, ...] = (True, False), backbone_only: bool = False,
             branch_step: int | None = None, log: Callable = _print) -> dict:
  """backbone_only: fill the caches of the real images and the backbone's passes (they do not
  depend on the branches) and return {'real': ...}.

  branch_step: score that finished branch step (default: the latest) from the caches, or,
  when it is the latest, from the checkpoint (branch training may go on meanwhile).

  {'real': {...}, 'bank' / 'nobank': {route: row} (a missing branch stage: {'skipped':
  why}), 'lpips_per_input': {stage: {route: (rows,)}}} as described in the module doc."""
  from fiancee_jax import data as fdata  # noqa: PLC0415 (heavy: tfds)
  from fiancee_jax.core.pipeline import PipelineError  # noqa: PLC0415
  from fiancee_jax.train import branches as br  # noqa: PLC0415
  if noises < 1 or not 0 <= lpips_noises <= noises:
    raise ExitQualityError(f'exit quality: noises={noises}, lpips_noises={lpips_noises}; '
                           'need noises >= 1 and 0 <= lpips_noises <= noises')
  c = backbone.config
  src = fdata.source(c.data, split, wd.data_dir(c, workdir))
  n = len(src) if num is None else min(int(num), len(src))
  base, real, _ = backbone.branch_losses().eval_rows(src, n)
  labels = np.asarray(base[0], np.int32)
  if labels.shape != real.shape[:3]:
    raise ExitQualityError(f'exit quality: route input 0 {labels.shape} is not a label map '
                           f'per real image {real.shape}')
  cache_dir = cache_dir or os.path.join(workdir, 'exit_quality')
  bb_step = checkpoint.finished_steps(workdir, 'backbone')[-1]
  skey = segmenter.meta.get('key', 'nokey')
  sc = _Scorers(segmenter)
  real_path = os.path.join(cache_dir, f'real_{split}{n}.npz')
  real_c = _load(real_path)
  if real_c is None:
    real_c = {'feats': np.concatenate([sc.feats(real[s:s + batch_size])
                                       for s in range(0, n, batch_size)])}
    _save(real_path, real_c)
  res: dict[str, Any] = {'real': {'n': n, 'split': split,
                                  **seg_lib.ceiling(c, workdir, segmenter, split)},
                         'lpips_per_input': {}}
  bb: dict[int, dict] = {}      # noise j -> the backbone's pass
  for use_bank in banks:
    stage = wd.branches_stage(use_bank)
    steps = checkpoint.finished_steps(workdir, stage)
    step = branch_step if branch_step is not None else (steps[-1] if steps else None)

    def cpath(j, stage=stage, step=step):
      return os.path.join(cache_dir, f'{stage}_b{bb_step}_s{step}_{split}{n}_j{j}'
                          f'{"_lp" if j < lpips_noises else ""}_{skey}.npz')
    cached = all(os.path.exists(cpath(j)) for j in range(noises)) and not backbone_only
    try:
      if step not in steps:
        raise PipelineError(f'no finished checkpoint {step} in {workdir}/checkpoints/{stage}')
      if not cached and step != steps[-1]:
        raise PipelineError(f'{stage} step {step} is not cached and not the latest '
                            f'({steps[-1]}): cannot be loaded')
      # all cached: the route costs and names only (branch weights are not needed)
      p = stages.load_pipeline(backbone, workdir, use_bank=use_bank, stages=(
          ('backbone', 'bank') if cached else ('backbone', 'bank', 'branches')))
    except PipelineError as e:
      res['bank' if use_bank else 'nobank'] = {'skipped': str(e)}
      continue
    names, keys = p.route_names, list(p.exits) + ['backbone']
    fn = br.images_fn(backbone, p.use_bank)
    acc: dict[str, list] = {}
    for j in range(noises):
      lp_on = j < lpips_noises
      path = cpath(j)
      bpath = os.path.join(cache_dir, f'backbone_b{bb_step}_{split}{n}_j{j}_{skey}.npz')
      got, bgot = _load(path), bb.get(j) or _load(bpath)
      if backbone_only:
        got = got or {}
      want = ({name for name in names if name != 'backbone'} if got is None else set()) | \
             ({'backbone'} if bgot is None else set())
      if want:
        r = _pass(fn, p.params, noise_rows(c, base, j), labels, names, keys, want, lp_on, sc,
                  batch_size, log, f'{stage} step {step} noise {j}')
        if got is None and not backbone_only:
          got = {k: v for k, v in r.items() if not k.startswith('backbone/')}
          _save(path, got)
        if bgot is None:
          bgot = {k: v for k, v in r.items() if k.startswith('backbone/')}
          _save(bpath, bgot)
      bb[j] = bgot
      if backbone_only:
        continue
      for k, v in {**got, **bgot}.items():
        acc.setdefault(k, []).append(v)
    if backbone_only:
      return res
    rows, per_input = {}, {}
    for i, name in enumerate(names):
      f = np.concatenate(acc[f'{name}/feats'])
      m, iou = seg_lib.miou_from_confusion(np.sum(acc[f'{name}/cm'], 0))
      row = {'gmacs': float(p.costs[i]), 'fid': sc.fid(f, real_c['feats']), 'fid_n': len(f),
             'fid_real_n': n, 'miou': m, 'miou_n': len(f), 'branch_step': step}
      if name == 'backbone':
        row.update(lpips=0.0, lpips_n=0, branch_step=None, backbone_step=bb_step)
      elif lpips_noises:
        lp = np.concatenate(acc[f'{name}/lpips'])
        per_input[name] = lp
        row.update(lpips=float(lp.mean()), lpips_std=float(lp.std()), lpips_n=len(lp))
      rows[name] = row
    res['bank' if use_bank else 'nobank'] = rows
    res['lpips_per_input'][stage] = per_input
  return res


# ---------------------------------------------------------------------------- report

def _kde(x: np.ndarray, grid: np.ndarray, factor: float) -> np.ndarray:
  """Gaussian KDE, bandwidth = factor x std (scipy's `bw_method=factor`)."""
  h = max(factor * float(np.std(x, ddof=1)), 1e-6)
  z = (grid[:, None] - x[None, :]) / h
  return np.exp(-0.5 * z * z).sum(1) / (len(x) * h * np.sqrt(2 * np.pi))


def fig8(per_input: dict[str, dict[str, np.ndarray]], path: str, title: str = '',
         bandwidth: float = 0.3) -> None:
  """Per-exit LPIPS (vs the backbone) densities, with (solid) vs without (dashed) the bank,
  as the paper's Fig. 8 (KDE, bandwidth 0.3)."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415
  guided, plain = per_input.get('branches', {}), per_input.get('branches_nobank', {})
  routes = sorted(set(guided) | set(plain), key=lambda r: int(r[4:]))
  allv = np.concatenate([v for d in (guided, plain) for v in d.values()])
  grid = np.linspace(0, max(float(allv.max()) * 1.1, 1e-3), 400)
  fig, axes = plt.subplots(1, len(routes), figsize=(3.2 * len(routes), 3.2), sharex=True,
                           squeeze=False)
  for ax, r in zip(axes[0], routes):
    for d, col, what in ((guided, 'C0', 'bank'), (plain, 'C3', 'no bank')):
      if r in d:
        ax.plot(grid, _kde(d[r], grid, bandwidth), color=col,
                label=f'{what}: mean {d[r].mean():.3f}, n={len(d[r])}')
    ax.set_title(r)
    ax.set_xlabel('LPIPS vs the backbone image')
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel('density')
  fig.suptitle(title or 'Per-exit LPIPS vs the backbone, with and without the bank', fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic_open(path) as f:
    fig.savefig(f, format='png', dpi=120)
  plt.close(fig)


def table(res: dict) -> str:
  """Markdown: one row per route, FID / mIoU / LPIPS / GMACs with and without the bank."""
  g = res.get('bank', {'skipped': 'not evaluated'})
  u = res.get('nobank', {'skipped': 'not evaluated'})
  routes = list(g) if 'skipped' not in g else list(u)
  if not routes or 'skipped' in (u if 'skipped' in g else g):
    return '(no branch stage to report)'
  any_row = (g if 'skipped' not in g else u)[routes[0]]

  def cell(d, r, k, fmt):
    return fmt.format(d[r][k]) if 'skipped' not in d and r in d and k in d[r] else '-'
  head = (f"| route | GMACs bank / no bank | FID (n={any_row['fid_n']} vs "
          f"{any_row['fid_real_n']} real) bank | no bank | mIoU bank | no bank | "
          f"LPIPS vs backbone (n={any_row.get('lpips_n', 0)}) bank | no bank |")
  lines = [head, '|' + '---|' * 8]
  for r in routes:
    lines.append(f"| {r} | {cell(g, r, 'gmacs', '{:.3f}')} / {cell(u, r, 'gmacs', '{:.3f}')} | "
                 f"{cell(g, r, 'fid', '{:.1f}')} | {cell(u, r, 'fid', '{:.1f}')} | "
                 f"{cell(g, r, 'miou', '{:.3f}')} | {cell(u, r, 'miou', '{:.3f}')} | "
                 f"{cell(g, r, 'lpips', '{:.3f}')} | {cell(u, r, 'lpips', '{:.3f}')} |")
  re = res['real']
  lines.append(f"| real {re['split']} images (ceiling) | | | | {re['miou']:.3f} | | | |")
  return '\n'.join(lines)

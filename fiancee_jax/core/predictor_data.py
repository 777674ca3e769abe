"""Predictor datasets (Sec. 3.2, S1.1.2, S1.2.2), written once for every backbone.

A predictor split is a set of rows; every row holds the predictor input (the prefix's
`pred_in`: OASIS the block-1 map, head avatars the driver's motion key) and the targets
LPIPS(exit k image, backbone image) of every exit, computed in one jitted pass per batch
(`core.pipeline.all_images`: prefix, guide and every backbone block once, + one LPIPS-VGG
pass over the backbone image and all exits together). The splits:
  train        rows the predictor learns from
  validation   held-out rows (Table S3)
  calibration  held-out rows never seen in training, exchangeable with `test`: the conformal
               offset calibrated on them holds on `test` (routing.conformal_offset)
  test         the test split's rows (Table S4); the sweep runs on it
What a row *is* is the adapter's (`Backbone.predictor_rows()`, the `PredictorRows` protocol
below): OASIS = label map x noise (maps x K fixed noises, fresh noises for calibration / test),
head avatars = (source frame, driver frame of another identity). Its `index` arrays identify
the rows; they are saved with them and hashed into the cache's fingerprint.

Cache: `<workdir>/predictor/dataset_<split>.npz` = {'feats', 'targets', *index, 'fingerprint'},
written atomically; a cache whose fingerprint (config, row index, stage checkpoints, bank
manifests) differs is rebuilt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fiancee_jax import config as cfg
from fiancee_jax import workdir as wd
from fiancee_jax.core import pipeline as pl
from fiancee_jax.core import stages
from fiancee_jax.core.interface import Backbone
from fiancee_jax.errors import FianceeError
from fiancee_jax.io_utils import atomic_open
from fiancee_jax.metrics import lpips as lpips_lib
from fiancee_jax.train import checkpoint

SPLITS = ('train', 'validation', 'calibration', 'test')
PyTree = Any


class PredictorDataError(FianceeError):
  """A predictor split that the config or the data cannot give."""


@dataclasses.dataclass(frozen=True)
class RowSet:
  """The rows of one predictor split: which data split they come from and the arrays that
  identify them (N rows each; saved with the rows, hashed in this order)."""
  data_split: str
  index: dict[str, np.ndarray]

  def __len__(self) -> int:
    return len(next(iter(self.index.values())))


class PredictorRows(Protocol):
  """What the predictor datasets ask a backbone (`Backbone.predictor_rows()`)."""

  def rows(self, workdir: str, split: str) -> RowSet:
    """The rows of a predictor split (one of SPLITS); cheap: no data is decoded."""

  def inputs(self, workdir: str, rows: RowSet) -> tuple[np.ndarray, ...]:
    """Host arrays (N, ...) the rows are computed from (decodes the data)."""

  def to_route(self, *stored: jax.Array) -> tuple[jax.Array, ...]:
    """A batch of `inputs` -> the route inputs (jittable; e.g. uint8 frames to [-1, 1])."""

  def pred_in_shape(self) -> tuple[int, ...]:
    """Shape of one row's predictor input (the prefix's `pred_in`, no batch axis)."""


def _identity(*x):
  return x


class Targets:
  """The jitted target pass of one pipeline: `(params, lp_params, *stored inputs) ->
  (pred_in (B, ...), LPIPS (B, E) of every exit vs the backbone image)`. The caller keeps it
  (one compile for every split it computes)."""

  def __init__(self, pipeline: pl.Pipeline,
               to_route: Callable[..., tuple] | None = None):
    self.pipeline = pipeline
    to_route = to_route or _identity

    def fn(params, lp_params, *stored):
      images = pl.all_images(pipeline, params, *to_route(*stored))
      exits = jnp.stack([images[k] for k in pipeline.exits])
      return images['pred_in'], lpips_lib.to_reference(lp_params, images['backbone'], exits).T
    self._fn = jax.jit(fn)

  def __call__(self, params: PyTree, lp_params: PyTree, *stored: Any):
    return self._fn(params, lp_params, *stored)

  def compute(self, params: PyTree, lp_params: PyTree, inputs: Sequence[np.ndarray],
              batch_size: int, name: str = 'dataset') -> dict[str, np.ndarray]:
    """{'feats': (N, ...), 'targets': (N, E)} of rows given as per-row arrays of equal length
    N; batches are padded to `batch_size` (one compile)."""
    n = len(inputs[0])
    feats, targets = [], []
    t0 = time.perf_counter()
    for start in range(0, n, batch_size):
      idx = np.arange(start, min(start + batch_size, n))
      pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
      f, t = self(params, lp_params, *(np.asarray(x)[pad] for x in inputs))
      feats.append(np.asarray(f)[:len(idx)])
      targets.append(np.asarray(t)[:len(idx)])
      done = idx[-1] + 1
      if done == n or (start // batch_size) % 10 == 0:
        rate = done / max(time.perf_counter() - t0, 1e-9)
        print(f'[predictor] {name}: {done}/{n} rows ({rate:.1f} rows/s)', flush=True)
    return {'feats': np.concatenate(feats),
            'targets': np.concatenate(targets).astype(np.float32)}


def targets_for(backbone: Backbone, pipeline: pl.Pipeline) -> Targets:
  """The target pass of `pipeline` on the stored inputs of the backbone's rows."""
  return Targets(pipeline, backbone.predictor_rows().to_route)


def cache_path(workdir: str, split: str) -> str:
  return os.path.join(wd.predictor_dir(workdir), f'dataset_{split}.npz')


def fingerprint(config, workdir: str, split: str, *arrays: np.ndarray) -> str:
  """What a cached split was made from: config, rows (the index arrays, hashed with their
  dtype), the stage checkpoints and the bank manifest(s) (OASIS: bank/manifest.json; head
  avatars: bank/<identity>/manifest.json)."""
  h = hashlib.sha256()
  h.update(cfg.config_hash(config, ('model', 'branches', 'data', 'bank')).encode())
  h.update(split.encode())
  for a in arrays:
    h.update(np.ascontiguousarray(a).tobytes())
  for stage in ('backbone', 'branches'):  # rows depend on the trained weights
    steps = [str(s) for s in checkpoint.finished_steps(workdir, stage)]  # not orbax tmp dirs
    h.update(f'{stage}:{steps[-1:]}'.encode())
  bank = wd.bank_dir(workdir)
  manifests = [os.path.join(bank, 'manifest.json')]
  if not os.path.exists(manifests[0]) and os.path.isdir(bank):
    manifests = sorted(os.path.join(bank, d, 'manifest.json') for d in os.listdir(bank))
  for m in manifests:
    if os.path.exists(m):
      with open(m, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()[:20]


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  """np.savez, atomically (a killed write leaves the old file)."""
  with atomic_open(path) as f:
    np.savez(f, **arrays)


def read_cache(path: str, fp: str, keys: Sequence[str]) -> dict[str, np.ndarray] | None:
  """The cached arrays when the file holds fingerprint `fp`, else None."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as f:
      if str(f['fingerprint']) == fp:
        return {k: f[k] for k in keys}
  except (OSError, KeyError, ValueError):
    pass  # unreadable or old cache: rebuilt by the caller
  return None


def cached(backbone: Backbone, workdir: str, split: str) -> dict[str, Any]:
  """Rows of a predictor split as `train.py --stage=predictor` cached them, never computed:
  a missing cache, or one made from other checkpoints, config or rows (its fingerprint), ends
  in one PredictorDataError naming the command that (re)makes it. Inference reads the
  calibration rows this way (the offset must come from the rows the predictor was judged on)."""
  if split not in SPLITS:
    raise PredictorDataError(f'predictor split {split!r}: expected one of {SPLITS}')
  rows = backbone.predictor_rows().rows(workdir, split)
  path = cache_path(workdir, split)
  cmd = wd.stage_cmd(backbone.config, workdir, 'python train.py --stage=predictor')
  if not os.path.exists(path):
    raise PredictorDataError(f'no {split} rows at {path}: the calibrated routing rules need '
                             f'them; run `{cmd}` (or route with --rule=paper)')
  fp = fingerprint(backbone.config, workdir, split, *rows.index.values())
  hit = read_cache(path, fp, ('feats', 'targets', *rows.index))
  if hit is None:
    raise PredictorDataError(f'{split} rows at {path} were made from other checkpoints, bank, '
                             f'config or rows than this workdir has now; rerun `{cmd}`')
  return hit | {'data_split': rows.data_split}


def dataset(backbone: Backbone, workdir: str, split: str, pipeline: pl.Pipeline | None = None,
            lp_params: PyTree = None, batch_size: int | None = None,
            targets: Targets | None = None) -> dict[str, Any]:
  """Rows of a predictor split: {'feats', 'targets', *the rows' index arrays (OASIS 'maps',
  'z'; head avatars 'sources', 'drivers'), 'data_split'}; read from the cache when it was made
  from the same config, rows and checkpoints, else computed and cached. `pipeline` (default:
  the workdir's backbone + bank + branches) and `targets` (default: `targets_for` it) are
  the caller's to reuse over splits."""
  if split not in SPLITS:
    raise PredictorDataError(f'predictor split {split!r}: expected one of {SPLITS}')
  source = backbone.predictor_rows()
  rows = source.rows(workdir, split)
  fp = fingerprint(backbone.config, workdir, split, *rows.index.values())
  path = cache_path(workdir, split)
  hit = read_cache(path, fp, ('feats', 'targets', *rows.index))
  if hit is not None:
    return hit | {'data_split': rows.data_split}
  if targets is None:
    if pipeline is None:
      pipeline = stages.load_pipeline(backbone, workdir, stages=('backbone', 'bank', 'branches'))
    targets = Targets(pipeline, source.to_route)
  pipeline = targets.pipeline
  lp_params = lpips_lib.load_params() if lp_params is None else lp_params
  bs = batch_size or min(max(int(backbone.config.predictor.batch_size), 1), 32)
  out = targets.compute(pipeline.params, lp_params, source.inputs(workdir, rows), bs, name=split)
  out.update(rows.index)
  save_npz(path, {**out, 'fingerprint': np.array(fp)})
  return out | {'data_split': rows.data_split}

"""MegaPortraits's predictor rows (Sec. 4.2, S1.2.2): (source frame, driver frame) pairs,
cross-reenactment as at inference; `core.predictor_data` computes them.

Sources are spread evenly over the data split; each gets K = predictor.num_noises drivers
drawn (fixed seed) from the split's frames of other identities (any frame when the split has
one identity):
  train        predictor.num_train sources of the 'train' split
  validation / calibration
               the predictor.num_validation 'validation' sources, split by
               routing.calibration_fraction
  test         predictor.num_test sources of the 'test' split
Index arrays: 'sources', 'drivers' (N,) int64 example indices in the data split. Stored
inputs: source, driver frames (N, H, W, 3) uint8 and the source identity (N,) int32 (it picks
the frame bank); the route takes the frames in [-1, 1].
Implements `core.predictor_data.PredictorRows`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fiancee_jax import workdir as wd
from fiancee_jax.core import routing
from fiancee_jax.core.predictor_data import SPLITS, PredictorDataError, RowSet


class HeadsPredictorRows:
  def __init__(self, config):
    self.config = config

  def _source(self, workdir: str, data_split: str):
    from fiancee_jax import data as fdata  # noqa: PLC0415 (heavy: tfds)
    return fdata.source(self.config.data, data_split, wd.data_dir(self.config, workdir))

  def rows(self, workdir: str, split: str) -> RowSet:
    c = self.config
    p = c.predictor
    if split == 'train':
      data_split, num, pick = 'train', p.num_train, None
    elif split in ('validation', 'calibration'):
      cal, val = routing.calibration_split(p.num_validation, c.routing.calibration_fraction,
                                           seed=c.seed)
      data_split, num, pick = 'validation', p.num_validation, (val if split == 'validation'
                                                               else cal)
    elif split == 'test':
      data_split, num, pick = 'test', p.num_test, None
    else:
      raise PredictorDataError(f'predictor split {split!r}: expected one of {SPLITS}')
    src = self._source(workdir, data_split)
    n = len(src)
    if num > n:
      raise PredictorDataError(f'config.predictor asks for {num} source frames of the '
                               f'{data_split!r} split, which has {n}: lower predictor.num_* '
                               'or raise the data size')
    sources = np.round(np.linspace(0, n - 1, num)).astype(np.int64)
    if pick is not None:
      sources = sources[pick]
    ids = np.array([int(src[i]['identity']) for i in range(n)])
    k = int(p.num_noises)
    drivers = []
    for s in sources:
      others = np.flatnonzero(ids != ids[s])
      others = others if len(others) else np.arange(n)
      rng = np.random.default_rng([c.seed, 29, SPLITS.index(split), int(s)])
      drivers.append(rng.choice(others, k, replace=len(others) < k))
    return RowSet(data_split, {'sources': np.repeat(sources, k),
                               'drivers': np.concatenate(drivers).astype(np.int64)})

  def inputs(self, workdir: str, rows: RowSet) -> tuple[np.ndarray, ...]:
    """(source, driver uint8 (N, H, W, 3), source identity (N,) int32); each frame decoded
    once."""
    src = self._source(workdir, rows.data_split)
    sources, drivers = rows.index['sources'], rows.index['drivers']
    uniq, inv = np.unique(np.concatenate([sources, drivers]), return_inverse=True)
    frames = [src[int(i)] for i in uniq]
    images = np.stack([np.asarray(f['image'], np.uint8) for f in frames])
    identity = np.array([int(f['identity']) for f in frames], np.int32)
    s_inv, d_inv = inv[:len(sources)], inv[len(sources):]
    return images[s_inv], images[d_inv], identity[s_inv]

  def to_route(self, source: jax.Array, driver: jax.Array, identity: jax.Array) -> tuple:
    to_pm1 = lambda x: x.astype(jnp.float32) / 127.5 - 1.0  # noqa: E731
    return to_pm1(source), to_pm1(driver), identity

  def pred_in_shape(self) -> tuple[int, ...]:
    """The driver's motion key: 3 Euler angles ++ the expression code."""
    return (3 + int(self.config.model.expr_dim),)

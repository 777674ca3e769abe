"""Random-access sources over prepared datasets, and derived sources of reenactment
pairs / triplets. Every source has `len()` and `__getitem__(int) -> dict of numpy`."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from fiancee_jax.data import heads

_SQUEEZE = ('label', 'mask')     # 1-channel PNGs stored as (H, W, 1) -> (H, W)


class Source:
  """A split of a prepared dataset (tfds array_record data source) as dicts of numpy."""

  def __init__(self, data_source: Any, builder_config: Any, name: str, split: str,
               dtypes: Optional[dict[str, Any]] = None):
    self._ds = data_source
    self._dtypes = dtypes or {}
    self.config, self.name, self.split = builder_config, name, split

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, i: int) -> dict[str, Any]:
    n = len(self)
    if not -n <= int(i) < n:
      raise IndexError(f'{self.name}/{self.split}: index {i} out of range [0, {n})')
    ex = self._ds[int(i) % n]
    out = {}
    for k, v in ex.items():
      if k in _SQUEEZE and np.ndim(v) == 3:
        v = v[..., 0]
      elif isinstance(v, bytes):
        v = v.decode()
      elif k in self._dtypes and np.ndim(v) == 0:
        v = np.asarray(v, self._dtypes[k])[()]   # numpy scalar of the feature's dtype
      out[k] = v
    return out

  def __repr__(self) -> str:
    return f'Source({self.name}/{self.config.name}, split={self.split!r}, len={len(self)})'


def _groups(src: Any, key: str) -> np.ndarray:
  """Group id (identity or video) of every example; heads know it without reading images."""
  cfg = getattr(src, 'config', None)
  if key == 'identity' and getattr(src, 'name', '') == 'synthetic_heads':
    ids = heads.split_identities(cfg.num_identities)[src.split]
    return np.repeat(np.asarray(ids), cfg.frames_per_identity)
  return np.array([int(src[i][key]) for i in range(len(src))])


class ReenactmentPairs:
  """Self-reenactment training pairs: item i = frame i (source) + another frame of the same
  group (`identity` or `video`) as driver, chosen from (seed, i). Keys are prefixed
  `source_` / `driver_`. Length = len(src)."""

  def __init__(self, src: Any, seed: int, group: str = 'identity'):
    self.src, self.seed, self.group = src, int(seed), group
    g = _groups(src, group)
    self._members = {k: np.flatnonzero(g == k) for k in np.unique(g)}
    self._group = g

  def __len__(self) -> int:
    return len(self.src)

  def driver_index(self, i: int) -> int:
    members = self._members[self._group[i]]
    others = members[members != i]
    if len(others) == 0:
      return int(i)
    r = np.random.default_rng([self.seed, 17, int(i)])
    return int(others[r.integers(len(others))])

  def __getitem__(self, i: int) -> dict[str, Any]:
    s, d = self.src[int(i)], self.src[self.driver_index(int(i))]
    return {**{f'source_{k}': v for k, v in s.items()}, **{f'driver_{k}': v for k, v in d.items()}}


class CrossReenactmentTriplets:
  """Evaluation triplets of `synthetic_heads`: a source frame, a driver frame of another
  identity, and the target = the source identity rendered with the driver's pose and
  expression (exact ground truth). `num` triplets, drawn from (seed, k)."""

  def __init__(self, src: Any, seed: int, num: Optional[int] = None):
    if getattr(src, 'name', '') != 'synthetic_heads':
      raise ValueError(f'cross-reenactment triplets need a synthetic_heads source (ground '
                       f'truth is rendered), got {src!r}')
    self.src, self.seed = src, int(seed)
    self._group = _groups(src, 'identity')
    if len(np.unique(self._group)) < 2:
      raise ValueError(f'{src!r}: cross-reenactment needs >= 2 identities in the split')
    self.num = len(src) if num is None else int(num)

  def __len__(self) -> int:
    return self.num

  def indices(self, k: int) -> tuple[int, int]:
    r = np.random.default_rng([self.seed, 19, int(k)])
    s = int(r.integers(len(self.src)))
    others = np.flatnonzero(self._group != self._group[s])
    return s, int(others[r.integers(len(others))])

  def __getitem__(self, k: int) -> dict[str, Any]:
    if not 0 <= int(k) < self.num:
      raise IndexError(f'triplet {k} out of range [0, {self.num})')
    si, di = self.indices(k)
    s, d = self.src[si], self.src[di]
    c = self.src.config
    t = heads.render_target(c.seed, int(s['identity']), d['pose'], d['expression'], c.size)
    out = {**{f'source_{k_}': v for k_, v in s.items()}, **{f'driver_{k_}': v for k_, v in d.items()}}
    out.update(target_image=t['image'], target_mask=t['mask'], target_identity=s['identity'],
               target_pose=d['pose'], target_expression=d['expression'])
    return out

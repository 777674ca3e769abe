"""Guiding bank (Sec. 3.3, 4.1, S1.1.1): build, farthest-point sampling, save/load, retrieval.

A bank is a set of key-value pairs. OASIS: keys are the 1024-d feature vectors of the 8x16
map after the first conv + ResBlock 1 (one key per grid position), tagged with the semantic
class that dominates that position's block of the label map; values are the (4, 4, 512)
patches (NHWC) of the map after ResBlock 3 on the same grid. Head avatars (Sec. 4.2): one key
per frame (3 angles + 512-d expression, grid 1x1), the value is the frame, no classes
(`classes=None` = one class); one bank per source identity, and `stack` merges several into
one bank whose class i is identity i (fiancee_jax/fiancee_heads.py). At inference each query
position fetches the value of its nearest key of the same class (L2) and the patches are
glued back into a guide feature map.

Building streams (keys, value map, classes) batches from a caller's `feature_fn` and keeps,
per class, a bounded candidate pool on disk (np.memmap, keys and values). When a pool fills
up (`pool_factor * max_per_class` rows) it is reduced to `max_per_class` rows by exact
farthest-point sampling (FPS); the end result is FPS of each class's last pool. This is
exact global FPS whenever a class has at most `pool_factor * max_per_class` keys in all, and
otherwise a streaming approximation of it (FPS over the previous selection + the new chunk).
Its cost is ~ max_per_class * keys_seen * D * pool_factor / (pool_factor - 1) — the same order
as exact global FPS, without holding all keys (paper: 6.4M x 1024) at once.

FPS starts from the first key of the class in stream order (pool index 0, which every
reduction keeps at index 0), picks argmax of the min-distance (ties: lowest index), never
picks a point twice.

Two retrieval backends give the same neighbours (exact L2): 'device' (queries sorted by
class, each tile scored by matmul + masked argmin against its class's key segment only;
jittable anywhere) and 'faiss' (one `faiss.IndexFlatL2` per class
on the host, called from jit through `jax.pure_callback`). A query whose class has no keys
in the bank (or an id outside [0, num_classes)) searches all keys instead: inference never
fails on a rare class.

Files under `<workdir>/bank/`: keys.npy (N, D) f32, values.npy (N, ph, pw, C) f32,
classes.npy (N,) i32 (sorted by class, FPS order inside a class), faiss/<class>.index,
manifest.json (format, backbone step, config hash, shapes, counts, per-class sizes, sha256
of every file). Written into a temp dir next to the target and swapped in by rename: an
existing bank is kept until the new one is complete.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import shutil
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from fiancee_jax.errors import FianceeError
from fiancee_jax.io_utils import remove_stale, temp_path

FORMAT_VERSION = 1
_KEYS, _VALUES, _CLASSES, _MANIFEST, _FAISS_DIR = (
    'keys.npy', 'values.npy', 'classes.npy', 'manifest.json', 'faiss')
# Manifest fields that `load(expect=...)` may check against the model.
EXPECT_FIELDS = ('config_hash', 'backbone_step', 'key_dim', 'value_shape', 'grid', 'num_classes')


class BankError(FianceeError):
  """A bank that is missing, corrupt, or built for another model."""


# --------------------------------------------------------------------------- layout helpers

def grid_classes(label_map: jax.Array, grid: tuple[int, int],
                 num_classes: int | None = None) -> jax.Array:
  """Class of each grid cell: majority vote over the cell's block of the label map.

  `label_map` is (B, H, W) integer ids (needs `num_classes`) or (B, H, W, C) one-hot / soft
  (per-pixel weights summed). H, W must be multiples of the grid. Ties go to the lowest id.
  """
  lm = jnp.asarray(label_map)
  if lm.ndim == 3:
    if num_classes is None:
      raise BankError('grid_classes: integer label map (B, H, W) needs num_classes')
    lm = jax.nn.one_hot(lm, num_classes, dtype=jnp.float32)
  if lm.ndim != 4:
    raise BankError(f'grid_classes: label map of shape {lm.shape}: expected (B, H, W) ids '
                    'or (B, H, W, C) one-hot')
  b, hh, ww, c = lm.shape
  h, w = grid
  if hh % h or ww % w:
    raise BankError(f'grid_classes: label map {hh}x{ww} is not a multiple of the grid {h}x{w}')
  votes = lm.astype(jnp.float32).reshape(b, h, hh // h, w, ww // w, c).sum(axis=(2, 4))
  return jnp.argmax(votes, axis=-1).astype(jnp.int32)  # argmax: first (lowest) id on ties


def to_patches(feature_map: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """(B, h*ph, w*pw, C) -> (B, h, w, ph, pw, C): cut a map into non-overlapping patches."""
  b, hh, ww, c = feature_map.shape
  h, w = grid
  if hh % h or ww % w:
    raise BankError(f'value map {hh}x{ww} is not a multiple of the key grid {h}x{w}')
  x = feature_map.reshape(b, h, hh // h, w, ww // w, c)
  return x.transpose(0, 1, 3, 2, 4, 5)


def glue(values: jax.Array, idx: jax.Array) -> jax.Array:
  """Gather value patches `values[idx]` (idx (B, h, w)) and glue them into (B, h*ph, w*pw, C)."""
  p = jnp.take(values, idx, axis=0)  # (B, h, w, ph, pw, C)
  b, h, w, ph, pw, c = p.shape
  return p.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * ph, w * pw, c)


# --------------------------------------------------------------------------- FPS

@functools.partial(jax.jit, static_argnames=('k',))
def _fps_device(points: jax.Array, num_valid: jax.Array, start: jax.Array, k: int) -> jax.Array:
  pts = points.astype(jnp.float32)
  n = pts.shape[0]
  min_d = jnp.where(jnp.arange(n) < num_valid, jnp.inf, -jnp.inf)  # -inf: never picked
  min_d = min_d.at[start].set(-jnp.inf)
  idx = jnp.zeros((k,), jnp.int32).at[0].set(start)

  def body(j, carry):
    idx, min_d = carry
    d = pts - pts[idx[j - 1]]
    min_d = jnp.minimum(min_d, jnp.sum(d * d, axis=-1))
    nxt = jnp.argmax(min_d).astype(jnp.int32)  # first index on ties
    return idx.at[j].set(nxt), min_d.at[nxt].set(-jnp.inf)

  idx, _ = lax.fori_loop(1, k, body, (idx, min_d))
  return idx


def fps(points: Any, k: int, num_valid: int | None = None, start: int = 0) -> np.ndarray:
  """Exact farthest-point sampling on device: indices (in pick order) of min(k, n) points.

  Only the first `num_valid` rows take part (padding lets pools of any fill share one
  compiled shape). Starts at `start`; each next point maximises the squared L2 distance to
  the points picked so far (ties: lowest index).
  """
  n = points.shape[0] if num_valid is None else int(num_valid)
  if k <= 0:
    raise BankError(f'fps: k={k}: expected > 0')
  if not 0 <= start < max(n, 1):
    raise BankError(f'fps: start={start} outside the {n} valid points')
  if n <= k:
    return np.arange(n, dtype=np.int64)
  idx = _fps_device(jnp.asarray(points), jnp.int32(n), jnp.int32(start), k)
  return np.asarray(idx).astype(np.int64)


# --------------------------------------------------------------------------- the bank pytree

class BankHost:
  """Host-side part of a bank (static under jit, hashed by identity): manifest, host keys,
  per-class FAISS indices (read from files or built on first use)."""

  def __init__(self, keys: np.ndarray, key_classes: np.ndarray, num_classes: int,
               manifest: dict | None = None, path: pathlib.Path | None = None):
    self.keys = keys
    self.key_classes = key_classes
    self.num_classes = num_classes
    self.manifest = manifest or {}
    self.path = path
    self.max_class_size = int(np.bincount(key_classes).max())  # static block for 'device'
    self._indices: dict[int, tuple[Any, np.ndarray]] | None = None
    self._all: Any = None

  def faiss_indices(self) -> dict[int, tuple[Any, np.ndarray]]:
    """{class: (IndexFlatL2 of that class's keys, their global ids)} for classes with keys."""
    if self._indices is None:
      faiss = _import_faiss()
      out = {}
      for c in range(self.num_classes):
        ids = np.flatnonzero(self.key_classes == c)
        if ids.size == 0:
          continue
        f = self.path / _FAISS_DIR / f'{c}.index' if self.path is not None else None
        if f is not None and f.exists():
          index = faiss.read_index(str(f))
          if index.ntotal != ids.size or index.d != self.keys.shape[1]:
            raise BankError(f'{f}: FAISS index holds {index.ntotal} x {index.d}, expected '
                            f'{ids.size} x {self.keys.shape[1]} — rebuild the bank with build_bank.py')
        else:
          index = faiss.IndexFlatL2(self.keys.shape[1])
          index.add(np.ascontiguousarray(self.keys[ids], dtype=np.float32))
        out[c] = (index, ids)
      self._indices = out
    return self._indices

  def faiss_all(self) -> Any:
    """IndexFlatL2 over every key: the fallback for a query class with no keys."""
    if self._all is None:
      index = _import_faiss().IndexFlatL2(self.keys.shape[1])
      index.add(np.ascontiguousarray(self.keys, dtype=np.float32))
      self._all = index
    return self._all

  def search(self, queries: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Nearest key id of each query among the keys of its class (host, FAISS)."""
    d = queries.shape[-1]
    q = np.ascontiguousarray(np.asarray(queries, np.float32).reshape(-1, d))
    c = np.asarray(classes).reshape(-1)
    out = np.zeros(q.shape[0], np.int32)
    indices = self.faiss_indices()
    for cls in np.unique(c):
      sel = np.flatnonzero(c == cls)
      if int(cls) in indices:
        index, ids = indices[int(cls)]
        _, i = index.search(q[sel], 1)
        out[sel] = ids[i[:, 0]]
      else:
        _, i = self.faiss_all().search(q[sel], 1)
        out[sel] = i[:, 0]
    return out.reshape(np.shape(queries)[:-1])


@struct.dataclass
class Bank:
  """Bank arrays (a pytree: pass it to jitted functions as an argument) + static host part."""
  keys: jax.Array          # (N, D) float32
  values: jax.Array        # (N, ph, pw, C)
  key_classes: jax.Array   # (N,) int32
  key_sqnorm: jax.Array    # (N,) float32, ||k||^2
  class_counts: jax.Array  # (num_classes,) int32: keys per class
  class_offsets: jax.Array  # (num_classes,) int32: first row of each class (rows sorted by class)
  host: BankHost = struct.field(pytree_node=False)

  @property
  def manifest(self) -> dict:
    return self.host.manifest


def make_bank(keys: Any, values: Any, classes: Any | None = None, num_classes: int | None = None,
              manifest: dict | None = None, path: pathlib.Path | None = None) -> Bank:
  """Bank from in-memory arrays: keys (N, D), values (N, ph, pw, C), classes (N,) or None.

  Rows are reordered by class (stable) when they are not already sorted: key ids returned
  by `nearest` index the bank's rows (`bank.keys`, `bank.host.keys`), not the inputs'."""
  keys_np = np.asarray(keys, np.float32)
  if keys_np.ndim != 2 or keys_np.shape[0] == 0:
    raise BankError(f'bank keys of shape {keys_np.shape}: expected (N>0, D)')
  n = keys_np.shape[0]
  if np.shape(values)[0] != n or len(np.shape(values)) != 4:
    raise BankError(f'bank values of shape {np.shape(values)}: expected ({n}, ph, pw, C)')
  cls_np = (np.zeros(n, np.int32) if classes is None else np.asarray(classes).astype(np.int32))
  if cls_np.shape != (n,):
    raise BankError(f'bank classes of shape {cls_np.shape}: expected ({n},)')
  if num_classes is None:
    num_classes = int(cls_np.max()) + 1
  if cls_np.min() < 0 or cls_np.max() >= num_classes:
    raise BankError(f'bank classes span [{cls_np.min()}, {cls_np.max()}]: expected ids in '
                    f'[0, {num_classes})')
  if (np.diff(cls_np) < 0).any():  # rows sorted by class: contiguous segments per class
    order = np.argsort(cls_np, kind='stable')
    keys_np, values, cls_np = keys_np[order], np.asarray(values)[order], cls_np[order]
  counts = np.bincount(cls_np, minlength=num_classes).astype(np.int32)
  offsets = (np.cumsum(counts) - counts).astype(np.int32)
  k = jnp.asarray(keys_np)
  return Bank(keys=k, values=jnp.asarray(values), key_classes=jnp.asarray(cls_np),
              key_sqnorm=jnp.sum(k * k, axis=-1), class_counts=jnp.asarray(counts),
              class_offsets=jnp.asarray(offsets),
              host=BankHost(keys_np, cls_np, num_classes, manifest, path))


def stack(banks: Sequence[Bank]) -> Bank:
  """One bank whose class i holds the rows of `banks[i]` (one-class banks with the same key
  dim and value shape): a search restricted to class i is a search in `banks[i]`.

  Head avatars (Sec. 4.2) keep one frame bank per source identity; a stage that sees several
  identities stacks theirs, and each example retrieves from its own source's frames (its
  class) inside one jitted step. The stacked bank has no files (FAISS indices are built in
  memory on first use); its manifest lists the stacked banks' manifests under 'stacked'."""
  if not banks:
    raise BankError('stack: expected at least one bank')
  d, vshape = banks[0].keys.shape[1], tuple(banks[0].values.shape[1:])
  for i, b in enumerate(banks):
    if b.host.num_classes != 1:
      raise BankError(f'stack: bank {i} has {b.host.num_classes} classes; expected one-class '
                      'banks (one per identity)')
    if b.keys.shape[1] != d or tuple(b.values.shape[1:]) != vshape:
      raise BankError(f'stack: bank {i} has key dim {b.keys.shape[1]} and values '
                      f'{tuple(b.values.shape[1:])}; bank 0 has {d} and {vshape}')
  sizes = [b.keys.shape[0] for b in banks]
  keys = np.concatenate([b.host.keys for b in banks])
  values = np.concatenate([np.asarray(b.values) for b in banks])
  classes = np.repeat(np.arange(len(banks), dtype=np.int32), sizes)
  return make_bank(keys, values, classes, len(banks),
                   manifest={'stacked': [b.manifest for b in banks]})


# --------------------------------------------------------------------------- retrieval

def _nearest_device(bank: Bank, q: jax.Array, c: jax.Array, query_tile: int) -> jax.Array:
  """Exact same-class nearest key on device: queries are sorted by class and taken in tiles
  of `query_tile`; each tile is scored against its class's contiguous key segment only
  (matmul ||k||^2 - 2 q.k — ||q||^2 does not change the argmin — masked to the segment,
  argmin). Work ~ (Q / tile + classes present) * tile * max_class_size * D instead of
  Q * N * D for a full masked scan. Queries whose class has no keys form one more group
  scored against all keys, block by block. Ties: lowest key id within a block."""
  n, d = bank.keys.shape
  nq = q.shape[0]
  nc = bank.class_counts.shape[0]
  m = bank.host.max_class_size  # static key-block length
  t = max(1, min(query_tile, nq))
  cc = jnp.clip(c, 0, nc - 1)
  has = (c >= 0) & (c < nc) & (bank.class_counts[cc] > 0)
  group = jnp.where(has, cc, nc)  # group nc: fallback to all keys
  order = jnp.argsort(group, stable=True)
  gs = group[order]
  qs = jnp.concatenate([q[order], jnp.zeros((t, d), q.dtype)])  # pad: tiles never clamp
  groups = jnp.arange(nc + 1)
  qstart = jnp.searchsorted(gs, groups, side='left').astype(jnp.int32)
  qend = jnp.searchsorted(gs, groups, side='right').astype(jnp.int32)
  kstart = jnp.concatenate([bank.class_offsets, jnp.zeros((1,), jnp.int32)])
  kend = jnp.concatenate([bank.class_offsets + bank.class_counts, jnp.full((1,), n, jnp.int32)])

  def tile(out, q0, qe, ks, ke):
    qt = lax.dynamic_slice_in_dim(qs, q0, t)

    def block(state):
      j, best_d, best_i = state
      a = jnp.minimum(ks + j * m, n - m)  # last block may overlap the previous: harmless
      kb = lax.dynamic_slice_in_dim(bank.keys, a, m)
      sq = lax.dynamic_slice_in_dim(bank.key_sqnorm, a, m)
      ids = a + jnp.arange(m, dtype=jnp.int32)
      s = sq[None, :] - 2.0 * jnp.dot(qt, kb.T, precision=lax.Precision.HIGHEST)
      s = jnp.where(((ids >= ks) & (ids < ke))[None, :], s, jnp.inf)
      i = jnp.argmin(s, axis=1)
      dmin = jnp.take_along_axis(s, i[:, None], axis=1)[:, 0]
      take = dmin < best_d
      return j + 1, jnp.where(take, dmin, best_d), jnp.where(take, ids[i], best_i)

    nblocks = (ke - ks + m - 1) // m
    init = (jnp.int32(0), jnp.full((t,), jnp.inf, jnp.float32), jnp.zeros((t,), jnp.int32))
    _, _, best_i = lax.while_loop(lambda st: st[0] < nblocks, block, init)
    rows = q0 + jnp.arange(t, dtype=jnp.int32)
    return out.at[jnp.where(rows < qe, rows, nq)].set(best_i, mode='drop')

  def per_group(g, out):
    ntiles = (qend[g] - qstart[g] + t - 1) // t

    def body(st):
      k, out = st
      return k + 1, tile(out, qstart[g] + k * t, qend[g], kstart[g], kend[g])

    return lax.while_loop(lambda st: st[0] < ntiles, body, (jnp.int32(0), out))[1]

  out_sorted = lax.fori_loop(0, nc + 1, per_group, jnp.zeros((nq,), jnp.int32))
  return jnp.zeros((nq,), jnp.int32).at[order].set(out_sorted)


def nearest(bank: Bank, queries: jax.Array, classes: jax.Array | None = None,
            backend: str = 'device', query_tile: int = 32) -> jax.Array:
  """Id of the nearest (L2) key of the same class for each query: (..., D) -> (...) int32.

  `backend`: 'device' (matmul + masked argmin per class segment, tiles of `query_tile`
  queries) or 'faiss' (host FAISS
  via `jax.pure_callback`, batched: one call for all queries, vmap broadcasts). Jittable
  with `bank` as an argument; a class with no keys falls back to all keys.
  """
  queries = jnp.asarray(queries)
  d = bank.keys.shape[1]
  if queries.shape[-1] != d:
    raise BankError(f'queries of shape {queries.shape}: expected last dim {d} (the bank key dim)')
  if classes is None:
    classes = jnp.zeros(queries.shape[:-1], jnp.int32)
  classes = jnp.asarray(classes)
  if tuple(classes.shape) != tuple(queries.shape[:-1]):
    raise BankError(f'classes of shape {classes.shape}: expected {queries.shape[:-1]} '
                    '(queries without the key dim)')
  classes = classes.astype(jnp.int32)
  if backend == 'device':
    lead = queries.shape[:-1]
    idx = _nearest_device(bank, queries.reshape(-1, d).astype(jnp.float32),
                          classes.reshape(-1), query_tile)
    return idx.reshape(lead)
  if backend == 'faiss':
    host = bank.host
    host.faiss_indices()  # read / build the indices now, not inside the callback
    out = jax.ShapeDtypeStruct(queries.shape[:-1], jnp.int32)
    return jax.pure_callback(host.search, out, queries.astype(jnp.float32), classes,
                             vmap_method='broadcast_all')
  raise BankError(f"bank backend={backend!r}: expected 'device' or 'faiss'")


def retrieve(bank: Bank, queries: jax.Array, classes: jax.Array | None = None,
             backend: str = 'device', query_tile: int = 32) -> jax.Array:
  """Guide feature map (Sec. 3.3): queries (B, h, w, D) + classes (B, h, w) or None ->
  values of the nearest same-class keys glued into (B, h*ph, w*pw, C)."""
  queries = jnp.asarray(queries)
  if queries.ndim != 4:
    raise BankError(f'queries of shape {queries.shape}: expected (B, h, w, D)')
  return glue(bank.values, nearest(bank, queries, classes, backend, query_tile))


# --------------------------------------------------------------------------- build

class FixedChunks:
  """Re-cut a stream of input batches into chunks of exactly `size` rows, for a bank build.

  `batches` yields tuples of arrays with one leading dim, of any length (the caller's read
  batch); every chunk has `size` rows (the last one padded by repeating its last row) and comes
  with the number of real rows. Input i is row i % size of a backbone call of one compiled
  shape, whatever the read batch was, so the features, and the bank files, do not depend on
  the caller's batch size (`tests/test_build_bank.py` checks equal sha256). Sized when
  `num_inputs` is given (progress bars)."""

  def __init__(self, batches: Iterable[tuple[np.ndarray, ...]], size: int,
               num_inputs: int | None = None):
    if size <= 0:
      raise BankError(f'compute batch {size}: expected > 0')
    self.batches, self.size, self.num_inputs = batches, int(size), num_inputs

  def __len__(self) -> int:
    if self.num_inputs is None:
      raise TypeError('FixedChunks without num_inputs has no length')
    return -(-self.num_inputs // self.size)

  def __iter__(self):
    rest = None  # the rows (< size) left over from the previous read batch
    for batch in self.batches:
      batch = tuple(np.asarray(a) for a in batch)
      whole = batch if rest is None else tuple(np.concatenate([r, a]) for r, a in zip(rest, batch))
      n, s = len(whole[0]), 0
      while n - s >= self.size:  # slices of one array per read batch: no copy per chunk
        yield tuple(a[s:s + self.size] for a in whole), self.size
        s += self.size
      rest = tuple(a[s:] for a in whole) if s < n else None
    if rest is not None:
      count = len(rest[0])
      pad = self.size - count
      yield tuple(np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in rest), count


def _import_faiss():
  try:
    import faiss  # noqa: PLC0415
  except ImportError as e:  # pragma: no cover - faiss-cpu is a runtime requirement
    raise BankError('the FAISS bank backend needs the faiss-cpu (or faiss-gpu) package') from e
  return faiss


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 23), b''):
      h.update(block)
  return h.hexdigest()


class _Pool:
  """Bounded per-class candidate pool on disk, reduced by FPS when full."""

  def __init__(self, folder: pathlib.Path, cls: int, cap: int, key_dim: int,
               value_shape: tuple[int, ...], k: int):
    self.keys = np.lib.format.open_memmap(folder / f'k{cls}.npy', 'w+', np.float32, (cap, key_dim))
    self.values = np.lib.format.open_memmap(folder / f'v{cls}.npy', 'w+', np.float32,
                                            (cap,) + value_shape)
    self.cap, self.k, self.n, self.seen, self.reductions = cap, k, 0, 0, 0

  def add(self, keys: np.ndarray, values: np.ndarray):
    self.seen += len(keys)
    i = 0
    while i < len(keys):
      if self.n == self.cap:
        self.reduce()
      m = min(self.cap - self.n, len(keys) - i)
      self.keys[self.n:self.n + m] = keys[i:i + m]
      self.values[self.n:self.n + m] = values[i:i + m]
      self.n += m
      i += m

  def reduce(self):
    if self.n <= self.k:
      return
    sel = fps(self.keys, self.k, num_valid=self.n)  # full-capacity array: one compiled shape
    self.keys[:self.k] = self.keys[sel]
    self.values[:self.k] = self.values[sel]
    self.n = self.k
    self.reductions += 1


def build(feature_fn: Callable[[Any], tuple[Any, Any, Any]], inputs: Iterable[Any],
          path: str | os.PathLike, *, max_per_class: int, num_classes: int | None = None,
          backbone_step: int | None = None, config_hash: str | None = None,
          pool_factor: int = 4, meta: Mapping[str, Any] | None = None,
          progress: bool = True) -> dict:
  """Stream `inputs` through `feature_fn`, keep <= max_per_class keys per class, write the bank.

  `feature_fn(batch) -> (keys (B, h, w, D), value_map (B, h*ph, w*pw, C), classes (B, h, w)
  int or None)`; value_map is cut into (ph, pw, C) patches on the key grid. `num_classes`:
  class ids must lie in [0, num_classes) (None: one class if classes are None, else max+1).
  Memory: per class a pool of pool_factor * max_per_class rows on disk (see the module doc).
  Writes `path` atomically (an existing bank survives a failing or killed build; the next
  build removes what a killed one left); returns the manifest.
  """
  if max_per_class <= 0:
    raise BankError(f'max_per_class={max_per_class}: expected > 0')
  if pool_factor < 2:
    raise BankError(f'pool_factor={pool_factor}: expected >= 2')
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  remove_stale(path)  # temporary folders of a killed build (one printed line)
  tmp = pathlib.Path(temp_path(path))
  tmp.mkdir()
  try:
    manifest = _build_into(tmp, feature_fn, inputs, max_per_class=max_per_class,
                           num_classes=num_classes, backbone_step=backbone_step,
                           config_hash=config_hash, pool_factor=pool_factor, meta=meta,
                           progress=progress)
    old = None
    if path.exists():
      old = pathlib.Path(temp_path(path))  # a kill after this swap: no bank (rebuilt)
      os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
    return manifest
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


def _build_into(out: pathlib.Path, feature_fn, inputs, *, max_per_class, num_classes,
                backbone_step, config_hash, pool_factor, meta, progress) -> dict:
  from tqdm.auto import tqdm  # noqa: PLC0415
  pool_dir = out / '_pools'
  pool_dir.mkdir()
  pools: dict[int, _Pool] = {}
  shapes = None  # (grid, key_dim, value_shape)
  has_classes = None
  num_inputs = 0
  total = len(inputs) if hasattr(inputs, '__len__') else None
  for bi, batch in enumerate(tqdm(inputs, total=total, desc='bank', unit='batch',
                                  disable=not progress)):
    keys, value_map, classes = feature_fn(batch)
    keys = np.asarray(keys, np.float32)
    value_map = np.asarray(value_map, np.float32)
    if keys.ndim != 4:
      raise BankError(f'feature_fn batch {bi}: keys of shape {keys.shape}: expected (B, h, w, D)')
    b, h, w, d = keys.shape
    if value_map.ndim != 4 or value_map.shape[0] != b:
      raise BankError(f'feature_fn batch {bi}: value map of shape {value_map.shape}: '
                      f'expected ({b}, h*ph, w*pw, C)')
    patches = np.asarray(to_patches(value_map, (h, w)))  # (B, h, w, ph, pw, C)
    here = ((h, w), d, patches.shape[3:])
    if shapes is None:
      shapes, has_classes = here, classes is not None
    elif here != shapes:
      raise BankError(f'feature_fn batch {bi}: grid/key dim/patch {here} differ from the first '
                      f'batch {shapes}')
    if (classes is not None) != has_classes:
      raise BankError(f'feature_fn batch {bi}: classes given for some batches only')
    if classes is None:
      cls = np.zeros(b * h * w, np.int64)
    else:
      cls = np.asarray(classes)
      if cls.shape != (b, h, w) or not np.issubdtype(cls.dtype, np.integer):
        raise BankError(f'feature_fn batch {bi}: classes {cls.shape} {cls.dtype}: expected '
                        f'integer ({b}, {h}, {w})')
      cls = cls.reshape(-1).astype(np.int64)
      top = num_classes if num_classes is not None else np.iinfo(np.int32).max
      if cls.min() < 0 or cls.max() >= top:
        raise BankError(f'feature_fn batch {bi}: class ids span [{cls.min()}, {cls.max()}]: '
                        f'expected [0, {num_classes})')
    flat_k = keys.reshape(-1, d)
    flat_v = patches.reshape((-1,) + shapes[2])
    for c in np.unique(cls):
      sel = np.flatnonzero(cls == c)
      if int(c) not in pools:
        pools[int(c)] = _Pool(pool_dir, int(c), pool_factor * max_per_class, d, shapes[2],
                              max_per_class)
      pools[int(c)].add(flat_k[sel], flat_v[sel])
    num_inputs += b
  if shapes is None:
    raise BankError('bank build: the inputs gave no batches')
  if num_classes is None:
    num_classes = 1 if not has_classes else max(pools) + 1
  for p in pools.values():
    p.reduce()

  grid, d, vshape = shapes
  order = sorted(pools)
  n = sum(pools[c].n for c in order)
  keys_f = np.lib.format.open_memmap(out / _KEYS, 'w+', np.float32, (n, d))
  vals_f = np.lib.format.open_memmap(out / _VALUES, 'w+', np.float32, (n,) + vshape)
  cls_all = np.zeros(n, np.int32)
  faiss = _import_faiss()
  (out / _FAISS_DIR).mkdir()
  o = 0
  for c in order:
    p = pools[c]
    keys_f[o:o + p.n] = p.keys[:p.n]
    for s in range(0, p.n, 1024):  # bounded RAM for large value patches
      e = min(p.n, s + 1024)
      vals_f[o + s:o + e] = p.values[s:e]
    cls_all[o:o + p.n] = c
    index = faiss.IndexFlatL2(d)
    index.add(np.ascontiguousarray(p.keys[:p.n]))
    faiss.write_index(index, str(out / _FAISS_DIR / f'{c}.index'))
    o += p.n
  keys_f.flush()
  vals_f.flush()
  del keys_f, vals_f
  np.save(out / _CLASSES, cls_all)
  reductions = {str(c): pools[c].reductions for c in order}
  seen = {str(c): pools[c].seen for c in order}
  pools.clear()
  shutil.rmtree(pool_dir)

  files = sorted([_KEYS, _VALUES, _CLASSES] +
                 [f'{_FAISS_DIR}/{f.name}' for f in (out / _FAISS_DIR).iterdir()])
  sizes = {str(c): 0 for c in range(num_classes)}
  sizes.update({str(c): int(v) for c, v in zip(*np.unique(cls_all, return_counts=True))})
  manifest = {
      'format_version': FORMAT_VERSION,
      'backbone_step': backbone_step,
      'config_hash': config_hash,
      'key_dim': int(d),
      'value_shape': [int(x) for x in vshape],
      'grid': [int(x) for x in grid],
      'num_classes': int(num_classes),
      'count': int(n),
      'class_sizes': sizes,
      'keys_seen': seen,
      'fps_reductions': reductions,
      'num_inputs': int(num_inputs),
      'max_per_class': int(max_per_class),
      'pool_factor': int(pool_factor),
      'fps': 'exact per pool; streaming when a class exceeds pool_factor * max_per_class',
      'created': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
      'meta': dict(meta or {}),
      'files': {f: {'sha256': _sha256(out / f), 'bytes': (out / f).stat().st_size}
                for f in files},
  }
  with open(out / _MANIFEST, 'w') as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  return manifest


# --------------------------------------------------------------------------- load

def _norm(v: Any) -> Any:
  return json.loads(json.dumps(v, default=list))


def load(path: str | os.PathLike, expect: Mapping[str, Any] | None = None,
         verify: bool = True) -> Bank:
  """Load a bank written by `build` and check it against the model.

  `expect`: manifest fields the model requires (any of EXPECT_FIELDS, e.g. config_hash,
  backbone_step, key_dim, value_shape, grid, num_classes); a mismatch, a missing file or a
  checksum failure (`verify`: sha256 of every file, ~2 s/GB) raises one BankError.
  """
  path = pathlib.Path(path)
  rebuild = 'rebuild it with build_bank.py'
  mf = path / _MANIFEST
  if not mf.is_file():
    raise BankError(f'no bank at {path} (missing {_MANIFEST}) — {rebuild}')
  try:
    manifest = json.loads(mf.read_text())
    files = manifest['files']
  except (ValueError, KeyError, TypeError) as e:
    raise BankError(f'{mf}: corrupt manifest ({e}) — {rebuild}') from e
  if manifest.get('format_version') != FORMAT_VERSION:
    raise BankError(f'{path}: bank format {manifest.get("format_version")}, this code reads '
                    f'{FORMAT_VERSION} — {rebuild}')
  if expect:
    unknown = sorted(set(expect) - set(EXPECT_FIELDS))
    if unknown:
      raise BankError(f'load(expect=...): unknown fields {unknown}; expected some of {EXPECT_FIELDS}')
    diff = [k for k in expect if _norm(manifest.get(k)) != _norm(expect[k])]
    if diff:
      built = ', '.join(f'{k}={manifest.get(k)!r}' for k in diff)
      want = ', '.join(f'{k}={_norm(expect[k])!r}' for k in diff)
      raise BankError(f'bank at {path} was built for {built}; this model has {want} — {rebuild}')
  for name, info in files.items():
    f = path / name
    if not f.is_file():
      raise BankError(f'bank at {path}: missing file {name} — {rebuild}')
    if f.stat().st_size != info['bytes']:
      raise BankError(f'bank at {path}: {name} has {f.stat().st_size} bytes, manifest says '
                      f'{info["bytes"]} (truncated or replaced) — {rebuild}')
    if verify and _sha256(f) != info['sha256']:
      raise BankError(f'bank at {path}: {name} fails its sha256 check (corrupt) — {rebuild}')
  try:
    keys = np.load(path / _KEYS, mmap_mode='r')
    values = np.load(path / _VALUES, mmap_mode='r')
    classes = np.load(path / _CLASSES)
  except (ValueError, OSError) as e:
    raise BankError(f'bank at {path}: unreadable array ({e}) — {rebuild}') from e
  n, d = manifest['count'], manifest['key_dim']
  want = {'keys': (n, d), 'values': (n, *manifest['value_shape']), 'classes': (n,)}
  got = {'keys': keys.shape, 'values': values.shape, 'classes': classes.shape}
  for k in want:
    if tuple(got[k]) != tuple(want[k]):
      raise BankError(f'bank at {path}: {k} of shape {got[k]}, manifest says {want[k]} — {rebuild}')
  return make_bank(np.asarray(keys), values, classes, manifest['num_classes'], manifest, path)

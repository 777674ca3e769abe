"""The bank pytree (device arrays + static host part) and nearest-key retrieval: 'device'
(matmul + masked argmin per class segment, jittable anywhere), 'faiss' (per-class FAISS
indices on the host through `jax.pure_callback`, on a GPU when faiss has GPUs and the platform
is GPU), or 'auto' (the faster of the two on this platform: index.py says why). Exact
('flat') by default; `with_index` gives a bank an approximate index ('ivf' both backends,
'hnsw' FAISS only)."""
from __future__ import annotations

import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from fiancee_jax.core.bank import index as ix
from fiancee_jax.core.bank.index import IndexSpec, resolve_backend
from fiancee_jax.core.bank.layout import BankError, glue

FAISS_DIR = 'faiss'   # per-class FAISS indices under the bank folder


class BankHost:
  """Host-side part of a bank (static under jit, hashed by identity): manifest, host keys,
  the index spec, per-class FAISS indices (flat: read from files or built on first use;
  ivf / hnsw: built on first use) and, for IVF, each class's (centroids, list of each key).
  `backend_used`: the backend the last `nearest` call traced with ('auto' resolved)."""

  def __init__(self, keys: np.ndarray, key_classes: np.ndarray, num_classes: int,
               manifest: dict | None = None, path: pathlib.Path | None = None,
               index: IndexSpec | None = None,
               ivf_parts: dict[int, tuple[np.ndarray, np.ndarray]] | None = None):
    self.keys = keys
    self.key_classes = key_classes
    self.num_classes = num_classes
    self.manifest = manifest or {}
    self.path = path
    self.index = index or IndexSpec()
    self.ivf_parts = ivf_parts
    self.max_class_size = int(np.bincount(key_classes).max())  # static block for 'device'
    self.backend_used: str | None = None
    self.faiss_on_gpu = False
    self._indices: dict[int, tuple[Any, np.ndarray]] | None = None
    self._all: Any = None

  def _place(self, faiss: Any, index: Any) -> Any:
    """The index on GPU 0 when faiss has GPUs and JAX runs on a GPU (flat, IVF; HNSW has no
    GPU version)."""
    if self.index.kind != 'hnsw' and ix.faiss_gpu_wanted(jax.default_backend(),
                                                         ix.faiss_gpu_count(faiss)):
      self.faiss_on_gpu = True
      return ix.FaissGpu.move(faiss, index)
    return index

  def faiss_indices(self) -> dict[int, tuple[Any, np.ndarray]]:
    """{class: (FAISS index of that class's keys, their global ids)} for classes with keys."""
    if self._indices is None:
      faiss = _import_faiss()
      out = {}
      for c in range(self.num_classes):
        ids = np.flatnonzero(self.key_classes == c)
        if ids.size == 0:
          continue
        f = self.path / FAISS_DIR / f'{c}.index' if self.path is not None else None
        if self.index.kind != 'flat':
          cent = self.ivf_parts[c][0] if self.ivf_parts else None
          index = ix.faiss_index(faiss, self.keys[ids], self.index, cent)
        elif f is not None and f.exists():
          index = faiss.read_index(str(f))
          if index.ntotal != ids.size or index.d != self.keys.shape[1]:
            raise BankError(f'{f}: FAISS index holds {index.ntotal} x {index.d}, expected '
                            f'{ids.size} x {self.keys.shape[1]} — rebuild the bank with build_bank.py')
        else:
          index = faiss.IndexFlatL2(self.keys.shape[1])
          index.add(np.ascontiguousarray(self.keys[ids], dtype=np.float32))
        out[c] = (self._place(faiss, index), ids)
      self._indices = out
    return self._indices

  def faiss_all(self) -> Any:
    """IndexFlatL2 over every key: the fallback for a query class with no keys."""
    if self._all is None:
      faiss = _import_faiss()
      index = faiss.IndexFlatL2(self.keys.shape[1])
      index.add(np.ascontiguousarray(self.keys, dtype=np.float32))
      self._all = index if self.index.kind == 'hnsw' else self._place(faiss, index)
    return self._all

  def search(self, queries: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Nearest key id of each query among the keys of its class (host, FAISS), with
    `index.faiss_threads` OpenMP threads when set (restored after)."""
    n = self.index.faiss_threads
    if not n:
      return self._search(queries, classes)
    faiss = _import_faiss()
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
      return self._search(queries, classes)
    finally:
      faiss.omp_set_num_threads(old)

  def _search(self, queries: np.ndarray, classes: np.ndarray) -> np.ndarray:
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
        miss = i[:, 0] < 0  # an approximate index found nothing: exact over the class
        if miss.any():
          kc = self.keys[ids]
          d2 = ((q[sel][miss, None, :] - kc[None]) ** 2).sum(-1)
          i[miss, 0] = d2.argmin(1)
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
  ivf: ix.DeviceIVF | None = None  # IVF lists on device (`with_index(..., IndexSpec('ivf'))`)

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


def with_index(bank: Bank, spec: IndexSpec | Any) -> Bank:
  """The same bank searched with index `spec` (an IndexSpec, or a config's `bank` section:
  bank.index, bank.ivf_nlist, ...). 'ivf' runs k-means per class now (faiss.Kmeans) and
  puts the lists on device too (a list-sorted copy of the keys: 2x key memory); 'hnsw'
  builds its FAISS graphs on first use. 'flat' gives back an exact bank."""
  if not isinstance(spec, IndexSpec):
    spec = IndexSpec.from_config(spec)
  h = bank.host
  parts, dev = None, None
  if spec.kind == 'ivf':
    faiss = _import_faiss()
    parts = {}
    for c in range(h.num_classes):
      ids = np.flatnonzero(h.key_classes == c)
      if ids.size:
        cent = ix.kmeans(faiss, h.keys[ids], spec)
        parts[c] = (cent, ix.assign(faiss, h.keys[ids], cent))
    dev = ix.device_ivf(h.keys, h.key_classes, h.num_classes, parts, spec)
  host = BankHost(h.keys, h.key_classes, h.num_classes, h.manifest, h.path, spec, parts)
  return bank.replace(host=host, ivf=dev)


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
            backend: str = 'auto', query_tile: int = 32) -> jax.Array:
  """Id of the nearest (L2) key of the same class for each query: (..., D) -> (...) int32.

  `backend`: 'device' (matmul + masked argmin per class segment, tiles of `query_tile`
  queries), 'faiss' (host FAISS via `jax.pure_callback`, batched: one call for all queries,
  vmap broadcasts) or 'auto' (`index.resolve_backend`: FAISS on CPU, device on GPU / TPU;
  the choice is logged and kept in `bank.host.backend_used`). The bank's index
  (`bank.host.index`, see `with_index`) decides exact or approximate. Jittable with `bank`
  as an argument; a class with no keys falls back to all keys (exact).
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
  kind = bank.host.index.kind
  backend = resolve_backend(backend, index=kind)
  bank.host.backend_used = backend
  if backend == 'device':
    lead = queries.shape[:-1]
    q, c = queries.reshape(-1, d).astype(jnp.float32), classes.reshape(-1)
    if kind == 'flat':
      idx = _nearest_device(bank, q, c, query_tile)
    elif kind == 'ivf':
      if bank.ivf is None:
        raise BankError("bank index 'ivf' without device lists: build it with with_index")
      idx = ix.nearest_ivf_device(bank.ivf, bank.keys, bank.key_sqnorm, bank.class_counts,
                                  bank.host.max_class_size, q, c)
    else:
      raise BankError(f"bank index {kind!r} has no device search (a graph walk): use "
                      "backend 'faiss' or 'auto'")
    return idx.reshape(lead)
  host = bank.host
  host.faiss_indices()  # read / build the indices now, not inside the callback
  out = jax.ShapeDtypeStruct(queries.shape[:-1], jnp.int32)
  return jax.pure_callback(host.search, out, queries.astype(jnp.float32), classes,
                           vmap_method='broadcast_all')


def retrieve(bank: Bank, queries: jax.Array, classes: jax.Array | None = None,
             backend: str = 'auto', query_tile: int = 32) -> jax.Array:
  """Guide feature map (Sec. 3.3): queries (B, h, w, D) + classes (B, h, w) or None ->
  values of the nearest same-class keys glued into (B, h*ph, w*pw, C)."""
  queries = jnp.asarray(queries)
  if queries.ndim != 4:
    raise BankError(f'queries of shape {queries.shape}: expected (B, h, w, D)')
  return glue(bank.values, nearest(bank, queries, classes, backend, query_tile))


def _import_faiss():
  try:
    import faiss  # noqa: PLC0415
  except ImportError as e:  # pragma: no cover - faiss-cpu is a runtime requirement
    raise BankError('the FAISS bank backend needs the faiss-cpu (or faiss-gpu) package') from e
  return faiss

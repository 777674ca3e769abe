"""Retrieval options: the backend ('auto' | 'device' | 'faiss', 'auto' resolved per platform
from measurements), the index ('flat' exact | 'ivf' | 'hnsw' approximate), FAISS GPU
placement, and the device-side IVF (a coarse quantiser per class, two segmented searches).

Why 'auto' picks what it picks (bench/retrieval.py, paper-size bank 122,100 x 1024 in 35
classes, exact search, ms per input at batch 1 / 64, 2-core AVX2 CPU): idle, device 193 / 28.8
and FAISS 112 / 11.6 (its default threads); shared with other jobs (load 3.5-6), device
241 / 35.9, FAISS 451 / 45.9 with 2 threads but 200 / 14.8 with 1 (`faiss_threads=1`). FAISS is
the fastest on CPU in every run given the right thread count, so on CPU 'auto' = 'faiss'
(README: 'FIANCEE: bank, branches, exit costs'). On GPU / TPU 'auto'
= 'device': not measured here (no accelerator was available); the device search is a
class-segmented matmul that stays on the chip, while the callback pays a device->host->device
copy of the queries per call (and on TPU there is no FAISS GPU index at all). Rerun the
bench on such a machine: it prints which backend was faster there.

IVF, shared by both backends: per class, k-means (faiss.Kmeans, fixed seed) with
min(nlist, class size // 39) centroids (at least 1); each key belongs to its nearest
centroid's list; a query scans the `nprobe` lists of its own class nearest to it (nprobe >=
lists: exact). FAISS runs
IndexIVFFlat over those very centroids; the device backend (1) picks the nprobe nearest
centroids of the query's class with the class-segmented search, (2) searches each probed
list (a contiguous segment of a list-sorted copy of the keys) with the same segmented search
and keeps the best. Both give the same neighbours up to float ties. HNSW is FAISS only
(IndexHNSWFlat per class): a graph walk is sequential and data-dependent, nothing a fixed-shape
XLA program does well. Queries whose class has no keys search all keys exactly, as 'flat'.

FAISS GPU: on a GPU platform with a GPU build of faiss (faiss.get_num_gpus() > 0), flat and
IVF indices are moved with faiss.index_cpu_to_gpu (HNSW has no GPU version and stays on the
host). Written without a GPU to run it on: only the selection logic is tested here.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from fiancee_jax.core.bank.layout import BankError

BACKENDS = ('auto', 'device', 'faiss')
INDEX_KINDS = ('flat', 'ivf', 'hnsw')
# platform -> backend 'auto' uses (see the module docstring for the figures behind it)
AUTO_BACKEND = {'cpu': 'faiss', 'gpu': 'device', 'cuda': 'device', 'rocm': 'device',
                'tpu': 'device'}

log = logging.getLogger(__name__)
_logged: set = set()


@dataclasses.dataclass(frozen=True)
class IndexSpec:
  """Which index a bank searches with. kind 'flat' = exact (the default)."""
  kind: str = 'flat'
  nlist: int = 64        # IVF: lists (k-means centroids) per class, at most the class size
  nprobe: int = 8        # IVF: lists scanned per query
  hnsw_m: int = 32       # HNSW: graph degree
  ef_search: int = 64    # HNSW: search beam
  niter: int = 20        # IVF: k-means iterations
  seed: int = 1234       # IVF: k-means seed
  device_tile: int = 8   # IVF, device: queries per matmul tile in the list stage
  faiss_threads: int = 0  # FAISS OpenMP threads per search (0: FAISS's default, all cores)

  def __post_init__(self):
    if self.kind not in INDEX_KINDS:
      raise BankError(f"bank index={self.kind!r}: expected one of {', '.join(map(repr, INDEX_KINDS))}")
    for f in ('nlist', 'nprobe', 'hnsw_m', 'ef_search', 'niter', 'device_tile'):
      if int(getattr(self, f)) < 1:
        raise BankError(f'bank index {f}={getattr(self, f)}: expected >= 1')
    if int(self.faiss_threads) < 0:
      raise BankError(f'bank faiss_threads={self.faiss_threads}: expected >= 0 (0: all cores)')

  @classmethod
  def from_config(cls, bank_cfg: Any) -> 'IndexSpec':
    """From a config's `bank` section (bank.index, bank.ivf_nlist, bank.ivf_nprobe,
    bank.hnsw_m, bank.hnsw_ef_search, bank.faiss_threads)."""
    return cls(kind=bank_cfg.index, nlist=int(bank_cfg.ivf_nlist),
               nprobe=int(bank_cfg.ivf_nprobe), hnsw_m=int(bank_cfg.hnsw_m),
               ef_search=int(bank_cfg.hnsw_ef_search),
               faiss_threads=int(bank_cfg.get('faiss_threads', 0)))


def resolve_backend(backend: str, platform: str | None = None, index: str = 'flat',
                    faiss_ok: bool | None = None) -> str:
  """'device' or 'faiss' for a requested backend on `platform` (default: JAX's default
  backend). 'auto': AUTO_BACKEND[platform] ('device' when faiss does not import; 'faiss'
  for an HNSW index, which only FAISS has)."""
  if backend not in BACKENDS:
    raise BankError(f"bank backend={backend!r}: expected one of {', '.join(map(repr, BACKENDS))}")
  if backend != 'auto':
    return backend
  platform = platform or jax.default_backend()
  if faiss_ok is None:
    faiss_ok = faiss_available()
  want = 'faiss' if index == 'hnsw' else AUTO_BACKEND.get(platform, 'device')
  got = want if (want == 'device' or faiss_ok) else 'device'
  if (platform, index, got) not in _logged:
    _logged.add((platform, index, got))
    log.info("bank backend 'auto' -> %r on platform %r (index %r)", got, platform, index)
  return got


def faiss_available() -> bool:
  try:
    import faiss  # noqa: F401, PLC0415
  except ImportError:
    return False
  return True


def faiss_gpu_wanted(platform: str, num_gpus: int) -> bool:
  """Move FAISS indices to a GPU: only on a GPU platform with a GPU build of faiss."""
  return platform in ('gpu', 'cuda', 'rocm') and num_gpus > 0


def faiss_gpu_count(faiss: Any) -> int:
  return int(faiss.get_num_gpus()) if hasattr(faiss, 'get_num_gpus') else 0


class FaissGpu:
  """One StandardGpuResources per process, indices moved to GPU 0 (needs faiss-gpu and a GPU:
  untested here)."""
  _res = None

  @classmethod
  def move(cls, faiss: Any, index: Any) -> Any:
    if cls._res is None:
      cls._res = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(cls._res, 0, index)


# ------------------------------------------------------------------------- host (FAISS)

MIN_PER_LIST = 39  # FAISS's k-means wants >= 39 training points per centroid


def lists_for(n: int, nlist: int) -> int:
  """IVF lists of a class of n keys: nlist, fewer for a small class (>= 39 keys per list)."""
  return max(1, min(nlist, n // MIN_PER_LIST))


def kmeans(faiss: Any, x: np.ndarray, spec: IndexSpec) -> np.ndarray:
  """Centroids (lists_for(len(x), nlist), D) of one class's keys."""
  k = lists_for(x.shape[0], spec.nlist)
  if k == 1:
    return x.mean(0, keepdims=True).astype(np.float32)
  km = faiss.Kmeans(x.shape[1], k, niter=spec.niter, seed=spec.seed, verbose=False)
  km.train(np.ascontiguousarray(x, np.float32))
  return np.ascontiguousarray(km.centroids, np.float32)


def assign(faiss: Any, x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  q = faiss.IndexFlatL2(centroids.shape[1])
  q.add(centroids)
  return q.search(np.ascontiguousarray(x, np.float32), 1)[1][:, 0].astype(np.int32)


def faiss_index(faiss: Any, x: np.ndarray, spec: IndexSpec, centroids: np.ndarray | None):
  """One class's FAISS index of kind spec.kind (IVF over the given centroids)."""
  d = x.shape[1]
  x = np.ascontiguousarray(x, np.float32)
  if spec.kind == 'flat':
    index = faiss.IndexFlatL2(d)
  elif spec.kind == 'ivf':
    quantizer = faiss.IndexFlatL2(d)
    quantizer.add(centroids)
    index = faiss.IndexIVFFlat(quantizer, d, centroids.shape[0])  # faiss keeps a ref to it
    index.train(x)  # the quantiser already holds nlist centroids: train keeps them
    index.nprobe = spec.nprobe
  else:
    index = faiss.IndexHNSWFlat(d, spec.hnsw_m)
  index.add(x)
  if spec.kind == 'hnsw':
    index.hnsw.efSearch = spec.ef_search
  return index


# ------------------------------------------------------------------------- device

@struct.dataclass
class DeviceIVF:
  """IVF lists on device: a copy of the keys sorted by (class, list), each list one segment."""
  centroids: jax.Array     # (L, D) every class's centroids, class by class
  cent_sqnorm: jax.Array   # (L,)
  class_cells: jax.Array   # (nc, 2) int32: [first, end) centroid rows of each class
  keys: jax.Array          # (N, D) keys sorted by (class, list)
  sqnorm: jax.Array        # (N,)
  cells: jax.Array         # (L, 2) int32: [first, end) rows of each list
  rows: jax.Array          # (N,) int32: bank row of each sorted key
  max_cells: int = struct.field(pytree_node=False)   # most lists in one class
  max_cell: int = struct.field(pytree_node=False)    # largest list
  nprobe: int = struct.field(pytree_node=False)
  tile: int = struct.field(pytree_node=False)


def device_ivf(keys: np.ndarray, key_classes: np.ndarray, num_classes: int,
               parts: dict[int, tuple[np.ndarray, np.ndarray]], spec: IndexSpec) -> DeviceIVF:
  """From per-class (centroids, list of each key) of a bank whose rows are sorted by class."""
  cents, cls_cells, order, cells = [], np.zeros((num_classes, 2), np.int32), [], []
  nl = 0
  for c in range(num_classes):
    ids = np.flatnonzero(key_classes == c)
    cls_cells[c] = (nl, nl)
    if ids.size == 0:
      continue
    cent, lists = parts[c]
    o = np.argsort(lists, kind='stable')
    counts = np.bincount(lists, minlength=cent.shape[0])
    start = len(np.concatenate(order)) if order else 0
    ends = start + np.cumsum(counts)
    cells.append(np.stack([ends - counts, ends], 1))
    order.append(ids[o])
    cents.append(cent)
    cls_cells[c] = (nl, nl + cent.shape[0])
    nl += cent.shape[0]
  rows = np.concatenate(order).astype(np.int32)
  cent_all = np.concatenate(cents)
  cells_all = np.concatenate(cells).astype(np.int32)
  k = jnp.asarray(keys[rows])
  c = jnp.asarray(cent_all)
  return DeviceIVF(centroids=c, cent_sqnorm=jnp.sum(c * c, -1),
                   class_cells=jnp.asarray(cls_cells), keys=k, sqnorm=jnp.sum(k * k, -1),
                   cells=jnp.asarray(cells_all), rows=jnp.asarray(rows),
                   max_cells=int((cls_cells[:, 1] - cls_cells[:, 0]).max()),
                   max_cell=int(max(1, (cells_all[:, 1] - cells_all[:, 0]).max())),
                   nprobe=spec.nprobe, tile=spec.device_tile)


def segmented_search(keys: jax.Array, sqnorm: jax.Array, segs: jax.Array, m: int,
                     q: jax.Array, group: jax.Array, tile: int, k: int
                     ) -> tuple[jax.Array, jax.Array]:
  """The k nearest rows of each query within its group's segment: segs (G, 2) [first, end)
  rows, group (Q,) in [0, G) (>= G: skipped). Queries sorted by group, tiles of `tile`
  scored against their segment in blocks of m rows (matmul ||k||^2 - 2 q.k). Returns ids
  (Q, k) int32 (-1 where fewer than k rows) and scores (Q, k) (inf there), best first."""
  n, d = keys.shape
  nq, ng = q.shape[0], segs.shape[0]
  m = min(m, n)
  t = max(1, min(tile, nq))
  order = jnp.argsort(group, stable=True)
  gs = group[order]
  qs = jnp.concatenate([q[order], jnp.zeros((t, d), q.dtype)])
  gids = jnp.arange(ng)
  qstart = jnp.searchsorted(gs, gids, side='left').astype(jnp.int32)
  qend = jnp.searchsorted(gs, gids, side='right').astype(jnp.int32)
  rows_m = jnp.arange(m, dtype=jnp.int32)

  def tile_fn(out, q0, qe, ks, ke):
    qt = lax.dynamic_slice_in_dim(qs, q0, t)

    def block(state):
      j, bd, bi = state
      lo = ks + j * m
      a = jnp.minimum(lo, n - m)  # the last block may overlap the previous one: masked
      kb = lax.dynamic_slice_in_dim(keys, a, m)
      sq = lax.dynamic_slice_in_dim(sqnorm, a, m)
      ids = a + rows_m
      s = sq[None, :] - 2.0 * jnp.dot(qt, kb.T, precision=lax.Precision.HIGHEST)
      s = jnp.where(((ids >= lo) & (ids < ke))[None, :], s, jnp.inf)
      cd = jnp.concatenate([bd, s], 1)
      ci = jnp.concatenate([bi, jnp.broadcast_to(ids, (t, m))], 1)
      neg, pos = lax.top_k(-cd, k)
      return j + 1, -neg, jnp.take_along_axis(ci, pos, 1)

    nblocks = (ke - ks + m - 1) // m
    init = (jnp.int32(0), jnp.full((t, k), jnp.inf, jnp.float32),
            jnp.full((t, k), -1, jnp.int32))
    _, bd, bi = lax.while_loop(lambda st: st[0] < nblocks, block, init)
    bi = jnp.where(jnp.isfinite(bd), bi, -1)
    r = q0 + jnp.arange(t, dtype=jnp.int32)
    r = jnp.where(r < qe, r, nq)
    return out[0].at[r].set(bi, mode='drop'), out[1].at[r].set(bd, mode='drop')

  def per_group(g, out):
    ntiles = (qend[g] - qstart[g] + t - 1) // t

    def body(st):
      j, o = st
      return j + 1, tile_fn(o, qstart[g] + j * t, qend[g], segs[g, 0], segs[g, 1])

    return lax.while_loop(lambda st: st[0] < ntiles, body, (jnp.int32(0), out))[1]

  init = (jnp.full((nq, k), -1, jnp.int32), jnp.full((nq, k), jnp.inf, jnp.float32))
  ids_s, d_s = lax.fori_loop(0, ng, per_group, init)
  ids = jnp.zeros_like(ids_s).at[order].set(ids_s)
  return ids, jnp.zeros_like(d_s).at[order].set(d_s)


def nearest_ivf_device(ivf: DeviceIVF, bank_keys: jax.Array, bank_sqnorm: jax.Array,
                       class_counts: jax.Array, max_class: int, q: jax.Array, c: jax.Array
                       ) -> jax.Array:
  """Nearest key (bank row) per query among the nprobe lists of its class nearest to it;
  queries whose class has no keys: exact over all keys."""
  nc = class_counts.shape[0]
  nq = q.shape[0]
  cc = jnp.clip(c, 0, nc - 1)
  has = (c >= 0) & (c < nc) & (class_counts[cc] > 0)
  p = ivf.nprobe
  probe, pd = segmented_search(ivf.centroids, ivf.cent_sqnorm, ivf.class_cells, ivf.max_cells,
                               q, jnp.where(has, cc, nc), 32, p)
  ncell = ivf.cells.shape[0]
  g = jnp.where(has[:, None] & (probe >= 0), probe, ncell).reshape(-1)
  ids, d = segmented_search(ivf.keys, ivf.sqnorm, ivf.cells, ivf.max_cell,
                            jnp.repeat(q, p, axis=0), g, ivf.tile, 1)
  ids, d = ids.reshape(nq, p), d.reshape(nq, p)
  best = jnp.take_along_axis(ids, jnp.argmin(d, 1)[:, None], 1)[:, 0]
  rows = ivf.rows[jnp.maximum(best, 0)]
  everything = jnp.array([[0, bank_keys.shape[0]]], jnp.int32)
  fb, _ = segmented_search(bank_keys, bank_sqnorm, everything, max_class, q,
                           jnp.where(has, 1, 0), 32, 1)
  return jnp.where(has, rows, fb[:, 0]).astype(jnp.int32)

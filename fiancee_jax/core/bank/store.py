"""Bank files: streamed build (bounded per-class pools reduced by FPS), fixed compute chunks,
manifest with checksums, atomic swap-in, load with checks against the model."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from fiancee_jax.core.bank.fps import fps
from fiancee_jax.core.bank.layout import BankError, to_patches
from fiancee_jax.core.bank.retrieve import FAISS_DIR, Bank, _import_faiss, make_bank
from fiancee_jax.io_utils import remove_stale, temp_path

FORMAT_VERSION = 1
_KEYS, _VALUES, _CLASSES, _MANIFEST = 'keys.npy', 'values.npy', 'classes.npy', 'manifest.json'
# Manifest fields that `load(expect=...)` may check against the model.
EXPECT_FIELDS = ('config_hash', 'backbone_step', 'key_dim', 'value_shape', 'grid', 'num_classes')


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
  (out / FAISS_DIR).mkdir()
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
    faiss.write_index(index, str(out / FAISS_DIR / f'{c}.index'))
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
                 [f'{FAISS_DIR}/{f.name}' for f in (out / FAISS_DIR).iterdir()])
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

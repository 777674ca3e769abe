"""Import official OASIS PyTorch checkpoints: generator (`*_EMA.pth` / `*_G.pth`) and
discriminator (`*_D.pth`, see `convert_discriminator_state_dict`; for fine-tuning / tests).

The file is a bare state_dict (boschresearch/OASIS utils.save_networks), read without torch
by `fiancee_jax.weights.torch_archive`. Mapping to `models.oasis.Generator` variables:
  fc.{weight,bias}, conv_img.*                    -> params/{fc,conv_img}/{kernel,bias}
  body.{i}.conv_{0,1,s}.weight_orig / .bias       -> params/body_i/conv_*/{kernel,bias}
  body.{i}.conv_*.weight_u / weight_v             -> spectral/body_i/conv_*/{u,v}
  body.{i}.norm_*.first_norm.running_{mean,var}   -> batch_stats/body_i/norm_*/first_norm/*
  body.{i}.norm_*.mlp_{shared.0,gamma,beta}.*     -> params/body_i/norm_*/mlp_*/*
Kernels OIHW -> HWIO; v is permuted from torch's (in, kh, kw) flattening to ours
(kh, kw, in). Spectral norm keeps weight_orig + the stored u, v: our eval-mode conv then
uses exactly torch's eval weight weight_orig / (u^T W v) (no power iteration), and the
import can still be fine-tuned. `num_batches_tracked` is ignored.

  python -m fiancee_jax.backbones.oasis.torch_weights best_EMA.pth --config configs/oasis_cityscapes.py \
      --out runs/cs
writes a backbone checkpoint (step 0) that `train.checkpoint.load_backbone` and the later
stages (build_bank.py, branches, predictor) accept.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fiancee_jax import config as cfg
from fiancee_jax import workdir as wdir
from fiancee_jax.backbones.oasis import discriminator as discriminators

from fiancee_jax.backbones.oasis import model as oasis
from fiancee_jax.errors import FianceeError
from fiancee_jax.train import checkpoint
from fiancee_jax.weights import torch_archive

_CONV = re.compile(r'^(fc|conv_img)\.(weight|bias)$')
_BLOCK_CONV = re.compile(r'^body\.(\d+)\.(conv_0|conv_1|conv_s)\.(weight_orig|bias|weight_u|weight_v)$')
_NORM_STAT = re.compile(r'^body\.(\d+)\.(norm_0|norm_1|norm_s)\.first_norm\.'
                        r'(running_mean|running_var|num_batches_tracked)$')
_D_CONV = re.compile(r'^(body_down|body_up)\.(\d+)\.(conv1\.[012]|conv2\.1|conv_s)\.'
                     r'(weight_orig|bias|weight_u|weight_v)$')
_D_LAST = re.compile(r'^layer_up_last\.(weight|bias)$')
_NORM_CONV = re.compile(r'^body\.(\d+)\.(norm_0|norm_1|norm_s)\.(mlp_shared\.0|mlp_gamma|mlp_beta)'
                        r'\.(weight|bias)$')


class ConversionError(FianceeError):
  """The checkpoint does not fit the generator the config describes."""


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torch state_dict file as {key: numpy array}, without torch."""
  obj = torch_archive.load(path)
  if not isinstance(obj, Mapping):
    raise ConversionError(f'{path}: expected a bare state_dict (OASIS *_G.pth / *_EMA.pth), '
                          f'got {type(obj).__name__}')
  sd = {str(k): v for k, v in obj.items()}
  if sd and all(k.startswith('module.') for k in sd):  # saved from DataParallel
    sd = {k[len('module.'):]: v for k, v in sd.items()}
  return sd


def _kernel(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(w, np.float32).transpose(2, 3, 1, 0))  # OIHW -> HWIO


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _put_conv(out: dict, base: tuple[str, ...], what: str, value: np.ndarray,
              shape: tuple[int, ...] | None, key: str) -> None:
  """One torch (spectral-norm) conv entry into out['params'] / out['spectral'] at `base`.
  `shape`: the conv's weight_orig shape (O, I, kh, kw), needed to reorder v."""
  if what in ('weight_orig', 'weight'):
    _set(out['params'], base + ('kernel',), _kernel(value))
  elif what == 'bias':
    _set(out['params'], base + ('bias',), value.astype(np.float32))
  elif what == 'weight_u':
    _set(out['spectral'], base + ('u',), value.astype(np.float32))
  else:
    if shape is None:
      raise ConversionError(f'{key}: no matching weight_orig in the checkpoint')
    _, cin, kh, kw = shape
    v = value.astype(np.float32).reshape(cin, kh, kw).transpose(1, 2, 0).reshape(-1)
    _set(out['spectral'], base + ('v',), v)


def convert_state_dict(sd: Mapping[str, Any]) -> dict[str, dict]:
  """OASIS generator state_dict -> {'params', 'batch_stats', 'spectral'} numpy trees."""
  out: dict[str, dict] = {'params': {}, 'batch_stats': {}, 'spectral': {}}
  unknown = []
  shapes = {}  # weight_orig shapes, to unflatten v
  for key, value in sd.items():
    if (m := _BLOCK_CONV.match(key)) and m.group(3) == 'weight_orig':
      shapes[(m.group(1), m.group(2))] = np.shape(value)
  for key, value in sd.items():
    value = np.asarray(value)
    if m := _CONV.match(key):
      _set(out['params'], (m.group(1), 'kernel' if m.group(2) == 'weight' else 'bias'),
           _kernel(value) if m.group(2) == 'weight' else value.astype(np.float32))
    elif m := _BLOCK_CONV.match(key):
      i, conv, what = m.groups()
      _put_conv(out, (f'body_{i}', conv), what, value, shapes.get((i, conv)), key)
    elif m := _NORM_STAT.match(key):
      i, norm, what = m.groups()
      if what != 'num_batches_tracked':
        _set(out['batch_stats'], (f'body_{i}', norm, 'first_norm',
                                  'mean' if what == 'running_mean' else 'var'),
             value.astype(np.float32))
    elif m := _NORM_CONV.match(key):
      i, norm, conv, what = m.groups()
      _set(out['params'], (f'body_{i}', norm, conv.split('.')[0],
                           'kernel' if what == 'weight' else 'bias'),
           _kernel(value) if what == 'weight' else value.astype(np.float32))
    else:
      unknown.append(key)
  if unknown:
    raise ConversionError(
        f'unexpected keys for an OASIS generator state_dict: {unknown[:8]}'
        f'{" ..." if len(unknown) > 8 else ""} (is this a *_D.pth discriminator file, or a '
        'checkpoint without spectral norm?)')
  return out


def _flat(tree: Any) -> dict[str, Any]:
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def convert_discriminator_state_dict(sd: Mapping[str, Any]) -> dict[str, dict]:
  """OASIS discriminator state_dict (`*_D.pth`) -> {'params', 'spectral'} numpy trees of
  `models.discriminators.OASISDiscriminator`:
    body_{down,up}.{i}.conv1.{0,1,2}.* / conv2.1.* / conv_s.*  -> body_{down,up}_i/conv{1,2,_s}
    layer_up_last.{weight,bias}                                 -> layer_up_last (no SN)
  """
  out: dict[str, dict] = {'params': {}, 'spectral': {}}
  shapes, unknown = {}, []
  for key, value in sd.items():
    if (m := _D_CONV.match(key)) and m.group(4) == 'weight_orig':
      shapes[m.group(1, 2, 3)] = np.shape(value)
  for key, value in sd.items():
    value = np.asarray(value)
    if m := _D_CONV.match(key):
      part, i, conv, what = m.groups()
      _put_conv(out, (f'{part}_{i}', conv.split('.')[0]), what, value,
                shapes.get((part, i, conv)), key)
    elif m := _D_LAST.match(key):
      _put_conv(out, ('layer_up_last',), m.group(1), value, None, key)
    else:
      unknown.append(key)
  if unknown:
    raise ConversionError(
        f'unexpected keys for an OASIS discriminator state_dict: {unknown[:8]}'
        f'{" ..." if len(unknown) > 8 else ""} (is this a generator *_G.pth / *_EMA.pth file?)')
  return out


def _checked(converted: dict[str, dict], want: dict[str, Any], what: str) -> dict[str, Any]:
  """`converted` restricted to the collections of `want` (an eval_shape of the model's init),
  as jnp arrays, after checking every leaf's presence and shape; else one ConversionError."""
  want_flat = {c: _flat(want[c]) for c in want}
  have_flat = {c: _flat(converted.get(c, {})) for c in want}
  problems = []
  for c in want:
    for k in sorted(set(want_flat[c]) - set(have_flat[c])):
      problems.append(f'missing {c}{k}')
    for k in sorted(set(have_flat[c]) - set(want_flat[c])):
      problems.append(f'unexpected {c}{k}')
    for k in sorted(set(want_flat[c]) & set(have_flat[c])):
      if tuple(want_flat[c][k].shape) != tuple(have_flat[c][k].shape):
        problems.append(f'{c}{k}: checkpoint shape {tuple(have_flat[c][k].shape)}, '
                        f'config expects {tuple(want_flat[c][k].shape)}')
  if problems:
    raise ConversionError(f'{what}: ' + '; '.join(problems[:10]) +
                          (f' ... ({len(problems)} problems)' if len(problems) > 10 else ''))
  return jax.tree.map(jnp.asarray, {c: converted.get(c, {}) for c in want})


def import_generator(path: str, generator: oasis.Generator) -> dict[str, Any]:
  """Load `path` into variables of `generator` (checked leaf by leaf against its shapes)."""
  converted = convert_state_dict(load_state_dict(path))
  b = 1
  seg = jax.ShapeDtypeStruct((b, generator.height, generator.width, generator.num_classes),
                             jnp.float32)
  z = jax.ShapeDtypeStruct((b, generator.z_dim), jnp.float32)
  want = jax.eval_shape(lambda s, zz: generator.init(jax.random.key(0), s, zz, False), seg, z)
  return _checked(converted, want, (
      f'{path} does not match the generator of this config (num_classes='
      f'{generator.num_classes}, ch={generator.ch}, z_dim={generator.z_dim}, spade_hidden='
      f'{generator.spade_hidden})'))


def import_discriminator(path: str,
                         discriminator: discriminators.OASISDiscriminator) -> dict[str, Any]:
  """Load an OASIS `*_D.pth` into variables of `discriminator` (checked like the generator)."""
  converted = convert_discriminator_state_dict(load_state_dict(path))
  side = 2 ** (len(discriminator.channels) - 1)
  image = jax.ShapeDtypeStruct((1, side, side, discriminator.channels[0]), jnp.float32)
  want = jax.eval_shape(lambda x: discriminator.init(jax.random.key(0), x), image)
  return _checked(converted, want, (
      f'{path} does not match the discriminator of this config (num_classes='
      f'{discriminator.num_classes}, channels={tuple(discriminator.channels)})'))


def write_backbone(variables: dict[str, Any], config, workdir: str, source: str) -> str:
  """Save imported generator variables as the workdir's backbone checkpoint (step 0) in the
  layout `train.checkpoint.load_backbone` reads. Refuses to overwrite an existing one."""
  directory = wdir.checkpoint_dir(workdir, 'backbone')
  if os.path.isdir(directory) and os.listdir(directory):
    raise FileExistsError(f'{directory} already holds a backbone checkpoint; import into '
                          'another --out workdir')
  state = {'train': {'ema_params_g': variables['params']},
           'ema_bn': {k: v for k, v in variables.items() if k != 'params'}}
  ckpt = checkpoint.Checkpointer(workdir, 'backbone', config)
  try:
    ckpt.save(0, state, meta={'imported_from': os.path.abspath(source), 'source': 'oasis_torch'})
  finally:
    ckpt.close()
  return directory


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description='Import an official OASIS generator checkpoint.')
  ap.add_argument('checkpoint', help='OASIS *_EMA.pth or *_G.pth (bare state_dict)')
  ap.add_argument('--config', required=True, help='configs/<name>.py[:arg]')
  ap.add_argument('--out', required=True, help='workdir to write the backbone checkpoint into')
  a = ap.parse_args(argv)
  config = cfg.load(a.config)
  variables = import_generator(a.checkpoint, oasis.from_config(config))
  directory = write_backbone(variables, config, a.out, a.checkpoint)
  print(f'wrote backbone checkpoint {directory} (config hash {cfg.config_hash(config)})')


if __name__ == '__main__':
  main(sys.argv[1:])

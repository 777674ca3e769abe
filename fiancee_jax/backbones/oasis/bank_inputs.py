"""OASIS's guiding bank (Sec. 4.1, S1.1.1): M train label maps x K fixed noises through the
trained backbone; keys = the block-`key_block` map (grid H/32 x W/32 for block 1, 1024-d at the
paper size), values = the block-`value_block` map (32x64x512) cut on the same grid into 4x4
patches, classes = the majority label of each grid cell. Written to `<workdir>/bank` with the
manifest (backbone step, model hash) and the K noises (`noises.npy`, reused by the predictor
stage).
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fiancee_jax import config as cfg
from fiancee_jax import data
from fiancee_jax import io_utils
from fiancee_jax import workdir as wd
from fiancee_jax.backbones.oasis import model as oasis
from fiancee_jax.core import bank as bank_lib
from fiancee_jax.core import stages
from fiancee_jax.core.pipeline import PipelineError

PyTree = Any
NOISE_TAG = 0x5EED   # fold_in tag of the K fixed noises (shared with the predictor stage)


def fixed_noises(config, num: int | None = None) -> np.ndarray:
  """The K fixed noises (K, z_dim) of the bank (Sec. 4.1: 100 fixed 3D noises), drawn from
  config.seed; saved with the bank as `bank/noises.npy` so later stages reuse them."""
  k = config.bank.num_noises if num is None else num
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), NOISE_TAG)
  return np.asarray(jax.random.normal(key, (k, config.model.z_dim)), np.float32)


def bank_features(generator: oasis.Generator, gen_vars: PyTree, seg_onehot: jax.Array,
                  z: jax.Array, key_block: int = 1, value_block: int = 3
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Bank rows of a batch: keys (B, h, w, Dk), values (B, H3, W3, Dv) glued (the builder cuts
  them on the key grid), classes (B, h, w) = majority label per grid cell."""
  seg_onehot = oasis.validate_inputs(seg_onehot, generator.num_classes, generator.height,
                                     generator.width)

  def f(mdl, seg, zz):
    cond = mdl.make_cond(seg, zz)
    return mdl.run_blocks(mdl.stem(cond), cond, 0, value_block, False)[1]
  feats = generator.apply(gen_vars, seg_onehot, z, method=f)
  keys = feats[f'block{key_block}']
  classes = bank_lib.grid_classes(seg_onehot, keys.shape[1:3])
  return keys, feats[f'block{value_block}'], classes


def load_bank(config, shapes: dict, workdir: str, backbone_step: int | None = None,
              verify: bool = True) -> bank_lib.Bank:
  """The bank of `workdir`, checked against this config (and the backbone step)."""
  return stages.load_bank_at(config, workdir, wd.bank_dir(workdir), shapes, backbone_step,
                             verify)


def _bank_meta(config, noises: np.ndarray, map_ids: np.ndarray) -> dict:
  return {'num_maps': int(config.bank.num_maps), 'num_noises': int(config.bank.num_noises),
          'max_per_class': int(config.bank.max_per_class), 'seed': int(config.seed),
          'noise_tag': NOISE_TAG, 'map_ids': [int(i) for i in map_ids],
          'noises': noises.tolist(), 'compute_batch': int(config.bank.compute_batch)}


def _write_noises(path: str, noises: np.ndarray) -> None:
  with io_utils.atomic_open(path) as f:
    np.save(f, noises)


def existing_bank_ok(config, shapes: dict, workdir: str, backbone_step: int | None
                     ) -> str | None:
  """None if `<workdir>/bank` is a complete bank for this config and backbone step (manifest,
  checksums, noises.npy, same maps x noises); else the reason it is not."""
  path = wd.bank_dir(workdir)
  if not os.path.isfile(os.path.join(path, 'manifest.json')):
    return 'no bank yet'
  try:
    bank = load_bank(config, shapes, workdir, backbone_step=backbone_step, verify=True)
  except PipelineError as e:
    return str(e)
  meta = bank.manifest.get('meta', {})
  for k in ('num_maps', 'num_noises', 'max_per_class', 'seed'):
    want = int(config.bank[k]) if k != 'seed' else int(config.seed)
    if meta.get(k) != want:
      return f'bank built with {k}={meta.get(k)}, config has {want}'
  noises_path = os.path.join(path, 'noises.npy')
  want = np.asarray(meta.get('noises'), np.float32)
  if not os.path.isfile(noises_path):
    _write_noises(noises_path, want)  # finish a build interrupted after the swap
  elif not np.array_equal(np.load(noises_path), want):
    return f'{noises_path} differs from the noises recorded in the manifest'
  return None


def build_bank(config, shapes: dict, workdir: str, gen_vars: PyTree, step: int | None, *,
               force: bool = False, batch_size: int = 16, progress: bool = True) -> dict:
  """M = bank.num_maps train label maps (random, fixed seed) x K = bank.num_noises fixed
  noises through the trained backbone; keys/values/classes streamed in batches into FPS
  (bank.max_per_class per class); saved to `<workdir>/bank` atomically with the manifest and
  `noises.npy`. An existing valid bank is kept (returns its manifest) unless `force`."""
  path = wd.bank_dir(workdir)
  if not force:
    why = existing_bank_ok(config, shapes, workdir, step)
    if why is None:
      print(f'[bank] {path} is up to date (backbone step {step}); skipping — pass --force '
            'to rebuild', flush=True)
      return bank_lib.load(path, verify=False).manifest
    if why != 'no bank yet':
      print(f'[bank] rebuilding {path}: {why}', flush=True)
  b = config.bank
  src = data.source(config.data, 'train', wd.data_dir(config, workdir))
  if b.num_maps > len(src):
    raise PipelineError(f'config.bank.num_maps={b.num_maps}: the train split has only '
                        f'{len(src)} label maps')
  rng = np.random.default_rng(config.seed)
  map_ids = np.sort(rng.choice(len(src), size=b.num_maps, replace=False))
  noises = fixed_noises(config)
  fn = jax.jit(functools.partial(bank_features, oasis.from_config(config),
                                 key_block=b.key_block, value_block=b.value_block))
  nc = config.data.num_classes
  pairs = [(int(m), j) for m in map_ids for j in range(b.num_noises)]

  def read_batches():  # host reads of batch_size inputs; a label map is decoded once
    cache = {}
    for s in range(0, len(pairs), batch_size):
      chunk = pairs[s:s + batch_size]
      cache = {m: cache[m] if m in cache else np.asarray(src[m]['label'], np.int32)
               for m in dict.fromkeys(m for m, _ in chunk)}
      yield np.stack([cache[m] for m, _ in chunk]), noises[[j for _, j in chunk]]

  def feature_fn(chunk):  # one compiled shape (bank.compute_batch), padding dropped
    (labels, z), n = chunk
    seg = jax.nn.one_hot(labels, nc, dtype=jnp.float32)
    keys, values, classes = fn(gen_vars, seg, z)
    return (np.asarray(keys)[:n], np.asarray(values)[:n], np.asarray(classes)[:n])

  chunks = bank_lib.FixedChunks(read_batches(), b.compute_batch, num_inputs=len(pairs))
  manifest = bank_lib.build(feature_fn, chunks, path, max_per_class=b.max_per_class,
                            num_classes=nc, backbone_step=step,
                            config_hash=cfg.config_hash(config),
                            meta=_bank_meta(config, noises, map_ids), progress=progress)
  _write_noises(os.path.join(path, 'noises.npy'), noises)
  print(f'[bank] wrote {path}: {manifest["count"]} keys from {len(pairs)} inputs '
        f'({b.num_maps} maps x {b.num_noises} noises), backbone step {step}', flush=True)
  return manifest

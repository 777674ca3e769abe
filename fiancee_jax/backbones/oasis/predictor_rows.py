"""OASIS's predictor rows (S1.1.2): label map x noise; `core.predictor_data` computes them.

  train        config.predictor.num_train maps of the 'train' split x the K fixed noises
               (K = config.predictor.num_noises; the bank's noises when build_bank saved them)
               or, with predictor.noises='fresh', x K new noises per map
  validation   held-out maps of the 'validation' split with the same K noises, or fresh ones
               (Table S3)
  calibration  the other part of the predictor.num_validation 'validation' maps
               (routing.calibration_fraction), each with a fresh noise
  test         predictor.num_test maps of the 'test' split with fresh noises (Table S4)
Index arrays: 'maps' (N,) int64 example index in the data split, 'z' (N, z_dim) float32.
Stored inputs: label ids (N, H, W) int32 and z; the route takes them as they are.
Implements `core.predictor_data.PredictorRows`.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from fiancee_jax import workdir as wd
from fiancee_jax.config import oasis_widths
from fiancee_jax.backbones.oasis import bank_inputs
from fiancee_jax.core import routing
from fiancee_jax.core.predictor_data import PredictorDataError, RowSet

FRESH_NOISE_TAGS = {'calibration': 101, 'test': 102,   # fold_in tags, not the bank's
                    'train': 103, 'validation': 104}


def fixed_noises(config, workdir: str, num: int) -> np.ndarray:
  """The K fixed noises (K, z_dim): the bank's (`<workdir>/bank/noises.npy`, saved by
  build_bank.py) when it holds at least K, else `bank_inputs.fixed_noises` (the same draw)."""
  path = os.path.join(wd.bank_dir(workdir), 'noises.npy')
  if os.path.exists(path):
    saved = np.load(path)
    if saved.ndim == 2 and saved.shape[1] == config.model.z_dim and saved.shape[0] >= num:
      return np.asarray(saved[:num], np.float32)
  return bank_inputs.fixed_noises(config, num)


def fresh_noises(config, split: str, num: int) -> np.ndarray:
  """New noises (num, z_dim) for the calibration / test rows (never the training ones)."""
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), FRESH_NOISE_TAGS[split])
  return np.asarray(jax.random.normal(key, (num, config.model.z_dim)), np.float32)


def load_labels(config, workdir: str, data_split: str, indices: np.ndarray) -> np.ndarray:
  """Label maps (len(indices), H, W) int32 of `indices` of a data split (a clear error when
  the split has fewer maps than the predictor config asks for)."""
  from fiancee_jax import data  # noqa: PLC0415 (heavy: tfds)
  src = data.source(config.data, data_split, wd.data_dir(config, workdir))
  need = int(np.max(indices)) + 1 if len(indices) else 0
  if need > len(src):
    raise PredictorDataError(f'config.predictor asks for {need} maps of the {data_split!r} '
                             f'split, which has {len(src)}: lower predictor.num_* or raise '
                             'data.num_*')
  return np.stack([np.asarray(src[int(i)]['label'], np.int32) for i in indices])


class OASISPredictorRows:
  def __init__(self, config):
    self.config = config

  def rows(self, workdir: str, split: str) -> RowSet:
    c = self.config
    p = c.predictor
    k = int(p.num_noises)
    noises = fixed_noises(c, workdir, k)
    fresh = p.noises == 'fresh'
    if split == 'train':
      data_split = 'train'
      maps = np.repeat(np.arange(p.num_train), k)
      z = fresh_noises(c, 'train', len(maps)) if fresh else np.tile(noises, (p.num_train, 1))
    elif split in ('validation', 'calibration'):
      cal, val = routing.calibration_split(p.num_validation, c.routing.calibration_fraction,
                                           seed=c.seed)
      data_split = 'validation'
      if split == 'validation':
        maps = val
        z = fresh_noises(c, 'validation', len(val)) if fresh else noises[np.arange(len(val)) % k]
      else:
        maps, z = cal, fresh_noises(c, 'calibration', len(cal))
    elif split == 'test':
      maps, z, data_split = np.arange(p.num_test), fresh_noises(c, 'test', p.num_test), 'test'
    else:
      raise PredictorDataError(f'predictor split {split!r}: expected train, validation, '
                               'calibration or test')
    return RowSet(data_split, {'maps': np.asarray(maps, np.int64),
                               'z': np.asarray(z, np.float32)})

  def inputs(self, workdir: str, rows: RowSet) -> tuple[np.ndarray, ...]:
    """(label ids (N, H, W) int32, z (N, z_dim)); each map is decoded once."""
    uniq, inv = np.unique(rows.index['maps'], return_inverse=True)
    labels = load_labels(self.config, workdir, rows.data_split, uniq)[inv]
    return labels, rows.index['z']

  def to_route(self, labels, z):
    return labels, z

  def pred_in_shape(self) -> tuple[int, ...]:
    """The block-1 map (H/32, W/32, C1) (the output of ResBlock 1, where the bank keys are)."""
    c = self.config
    return (c.data.height // 32, c.data.width // 32, oasis_widths(c.model.ch)[1])

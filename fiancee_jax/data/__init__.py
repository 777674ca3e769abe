"""Datasets (tensorflow-datasets builders, array_record, no TensorFlow) and the loader.

  prepare(config.data, data_dir)            build the array_record files once (idempotent)
  source(config.data, split, data_dir)      random-access split: len(), [i] -> dict of numpy
  Loader(source, batch_size, seed=...)      shuffled, per-process sharded, resumable batches
  reenactment_pairs / cross_reenactment     head-avatar pairs (train) and triplets (eval)

Datasets: synthetic_streets, synthetic_heads (procedural), cityscapes, video_frames (the
user's download in `config.data.manual_dir`).
"""
from __future__ import annotations

import pathlib
from typing import Any, Optional

from fiancee_jax.data.loader import Loader, LoaderError, collate  # noqa: F401


def _builder(data_config: Any, data_dir: str):
  from fiancee_jax.data import builders
  return builders.make_builder(data_config, str(data_dir))


def prepare(data_config: Any, data_dir: str) -> pathlib.Path:
  """Write every split of `data_config` as array_record under `data_dir` unless a complete
  copy is there (kill-safe: what a killed prepare left is removed and built again,
  `builders.prepare`). Returns the prepared folder `<data_dir>/<name>/<config>/<version>`."""
  from fiancee_jax.data import builders
  return builders.prepare(data_config, str(data_dir))


def source(data_config: Any, split: str, data_dir: str, *, prepare_if_missing: bool = True):
  """Random-access source of one split ('train' | 'validation' | 'test')."""
  from fiancee_jax.data import builders
  from fiancee_jax.data.sources import Source
  b = _builder(data_config, data_dir)
  if builders.missing(b) is not None:
    if not prepare_if_missing:
      raise builders.DataError(f'{b.name} is not prepared under {data_dir!r}: run '
                               'fiancee_jax.data.prepare(config.data, data_dir) first')
    prepare(data_config, data_dir)
    b = _builder(data_config, data_dir)
  splits = sorted(b.info.splits.keys())
  if split not in splits:
    raise builders.DataError(f'{b.name}: split {split!r} not available; prepared splits: '
                             f'{splits} (in {b.data_dir})')
  features = b.info.features
  dtypes = {k: features[k].np_dtype for k in features.keys()
            if k not in ('image', 'label', 'mask', 'file_name')}
  return Source(b.as_data_source(split), b.builder_config, b.name, split, dtypes)


def reenactment_pairs(src: Any, seed: int, group: Optional[str] = None):
  """Self-reenactment pairs (two frames of one identity / video) as a random-access source.
  `group` defaults to 'video' for video_frames, 'identity' otherwise."""
  from fiancee_jax.data.sources import ReenactmentPairs
  if group is None:
    group = 'video' if getattr(src, 'name', '') == 'video_frames' else 'identity'
  return ReenactmentPairs(src, seed, group)


def cross_reenactment(src: Any, seed: int, num: Optional[int] = None):
  """Cross-reenactment triplets (source, driver of another identity, exact target) of a
  synthetic_heads source, as a random-access source."""
  from fiancee_jax.data.sources import CrossReenactmentTriplets
  return CrossReenactmentTriplets(src, seed, num)

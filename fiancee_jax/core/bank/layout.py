"""Bank layout: the key grid (majority class per cell), value patches cut on it and glued
back (Sec. 3.3: a guide map of retrieved patches)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fiancee_jax.errors import FianceeError


class BankError(FianceeError):
  """A bank that is missing, corrupt, or built for another model."""


def grid_classes(label_map: jax.Array, grid: tuple[int, int],
                 num_classes: int | None = None) -> jax.Array:
  """Class of each grid cell: majority vote over the cell's block of the label map.

  `label_map` is (B, H, W) integer ids (needs `num_classes`) or (B, H, W, C) one-hot / soft
  (per-pixel weights summed). H, W must be multiples of the grid. Ties go to the lowest id.
  """
  lm = jnp.asarray(label_map)
  if lm.ndim == 3:
    if num_classes is None:
      raise BankError('grid_classes: integer label map (B, H, W) needs num_classes')
    lm = jax.nn.one_hot(lm, num_classes, dtype=jnp.float32)
  if lm.ndim != 4:
    raise BankError(f'grid_classes: label map of shape {lm.shape}: expected (B, H, W) ids '
                    'or (B, H, W, C) one-hot')
  b, hh, ww, c = lm.shape
  h, w = grid
  if hh % h or ww % w:
    raise BankError(f'grid_classes: label map {hh}x{ww} is not a multiple of the grid {h}x{w}')
  votes = lm.astype(jnp.float32).reshape(b, h, hh // h, w, ww // w, c).sum(axis=(2, 4))
  return jnp.argmax(votes, axis=-1).astype(jnp.int32)  # argmax: first (lowest) id on ties


def to_patches(feature_map: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """(B, h*ph, w*pw, C) -> (B, h, w, ph, pw, C): cut a map into non-overlapping patches."""
  b, hh, ww, c = feature_map.shape
  h, w = grid
  if hh % h or ww % w:
    raise BankError(f'value map {hh}x{ww} is not a multiple of the key grid {h}x{w}')
  x = feature_map.reshape(b, h, hh // h, w, ww // w, c)
  return x.transpose(0, 1, 3, 2, 4, 5)


def glue(values: jax.Array, idx: jax.Array) -> jax.Array:
  """Gather value patches `values[idx]` (idx (B, h, w)) and glue them into (B, h*ph, w*pw, C)."""
  p = jnp.take(values, idx, axis=0)  # (B, h, w, ph, pw, C)
  b, h, w, ph, pw, c = p.shape
  return p.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * ph, w * pw, c)

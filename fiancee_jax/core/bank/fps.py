"""Exact farthest-point sampling on device (the bank builder's per-class selection)."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fiancee_jax.core.bank.layout import BankError


@functools.partial(jax.jit, static_argnames=('k',))
def _fps_device(points: jax.Array, num_valid: jax.Array, start: jax.Array, k: int) -> jax.Array:
  pts = points.astype(jnp.float32)
  n = pts.shape[0]
  min_d = jnp.where(jnp.arange(n) < num_valid, jnp.inf, -jnp.inf)  # -inf: never picked
  min_d = min_d.at[start].set(-jnp.inf)
  idx = jnp.zeros((k,), jnp.int32).at[0].set(start)

  def body(j, carry):
    idx, min_d = carry
    d = pts - pts[idx[j - 1]]
    min_d = jnp.minimum(min_d, jnp.sum(d * d, axis=-1))
    nxt = jnp.argmax(min_d).astype(jnp.int32)  # first index on ties
    return idx.at[j].set(nxt), min_d.at[nxt].set(-jnp.inf)

  idx, _ = lax.fori_loop(1, k, body, (idx, min_d))
  return idx


def fps(points: Any, k: int, num_valid: int | None = None, start: int = 0) -> np.ndarray:
  """Exact farthest-point sampling on device: indices (in pick order) of min(k, n) points.

  Only the first `num_valid` rows take part (padding lets pools of any fill share one
  compiled shape). Starts at `start`; each next point maximises the squared L2 distance to
  the points picked so far (ties: lowest index).
  """
  n = points.shape[0] if num_valid is None else int(num_valid)
  if k <= 0:
    raise BankError(f'fps: k={k}: expected > 0')
  if not 0 <= start < max(n, 1):
    raise BankError(f'fps: start={start} outside the {n} valid points')
  if n <= k:
    return np.arange(n, dtype=np.int64)
  idx = _fps_device(jnp.asarray(points), jnp.int32(n), jnp.int32(start), k)
  return np.asarray(idx).astype(np.int64)

"""Refresh batch-norm statistics of averaged (EMA) weights before using them.

EMA-averaged running statistics do not match EMA-averaged weights, so OASIS runs the EMA
generator in train mode on 50 batches (BN momentum 0.1 makes the running stats those of
the current weights) before every evaluation / save. Every stage that uses the backbone's
EMA weights calls this.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax

PyTree = Any
# apply_fn(variables, batch) -> (outputs, mutated collections), i.e.
# lambda v, b: model.apply(v, b['label'], z, train=True, mutable=['batch_stats', 'spectral'])
ApplyFn = Callable[[PyTree, PyTree], tuple[Any, PyTree]]


@functools.lru_cache(maxsize=8)
def _compiled(apply_fn: ApplyFn):
  def update(params, collections, batch):
    _, mutated = apply_fn({'params': params, **collections}, batch)
    return {**collections, **dict(mutated)}
  return jax.jit(update)


def refresh_bn_stats(apply_fn: ApplyFn, params: PyTree, collections: dict[str, PyTree],
                     batches: Iterable[PyTree]) -> dict[str, PyTree]:
  """Run train-mode forwards of `apply_fn` on each batch, threading the mutable collections
  (running stats, spectral-norm vectors); params are untouched. Returns the new collections.
  Keep `apply_fn` the same object across calls (it keys the compiled function)."""
  update = _compiled(apply_fn)
  collections = dict(collections)
  for batch in batches:
    collections = update(params, collections, batch)
  return collections

"""Refresh batch-norm statistics of averaged (EMA) weights before using them.

EMA-averaged running statistics do not match EMA-averaged weights, so OASIS runs the EMA
generator in train mode on 50 batches (BN momentum 0.1 makes the running stats those of
the current weights) before every evaluation / save. Every stage that uses the backbone's
EMA weights calls this.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import jax

PyTree = Any
# apply_fn(variables, batch) -> (outputs, mutated collections), i.e.
# lambda v, b: model.apply(v, b['label'], z, train=True, mutable=['batch_stats', 'spectral'])
ApplyFn = Callable[[PyTree, PyTree], tuple[Any, PyTree]]


def compile_update(apply_fn: ApplyFn) -> Callable:
  """The jitted update of one refresh step (the caller keeps it: one compilation per owner)."""
  def update(params, collections, batch):
    _, mutated = apply_fn({'params': params, **collections}, batch)
    return {**collections, **dict(mutated)}
  return jax.jit(update)


def refresh_bn_stats(update: Callable, params: PyTree, collections: dict[str, PyTree],
                     batches: Iterable[PyTree]) -> dict[str, PyTree]:
  """Run train-mode forwards (`update = compile_update(apply_fn)`) on each batch, threading
  the mutable collections (running stats, spectral-norm vectors); params are untouched.
  Returns the new collections."""
  collections = dict(collections)
  for batch in batches:
    collections = update(params, collections, batch)
  return collections

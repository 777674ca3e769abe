"""The GAN train state (one pytree) and the helpers every stage shares: EMA, variables.

`GANState` holds everything exact resume needs: step, params, the mutable model
collections (sync-BN 'batch_stats', spectral-norm 'spectral'), the EMA generator (params
and collections, averaged like OASIS averages the whole state_dict), both optimiser states
and the base rng. It is a flax struct (a plain pytree) so orbax saves it as it is.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class GANState:
  """Generator + discriminator training state (OASIS backbone stage)."""
  step: jax.Array          # int32 scalar: number of completed train steps
  params_g: PyTree
  params_d: PyTree
  state_g: PyTree          # G's mutable collections: {'batch_stats': ..., 'spectral': ...}
  state_d: PyTree          # D's mutable collections (spectral norm u, v)
  ema_params_g: PyTree     # EMA of params_g (decay config.train.ema_decay)
  ema_state_g: PyTree      # EMA of state_g (OASIS averages running stats and u, v too)
  opt_g: optax.OptState
  opt_d: optax.OptState
  rng: jax.Array           # uint32[2] base key; per step: fold_in(rng, step)


@flax.struct.dataclass
class StepState:
  """What a jitted train step carries: the checkpointed `train` state and `frozen` arrays it
  only reads (pretrained loss trunks such as VGG19): jit arguments, never constants, and
  never checkpointed."""
  train: Any
  frozen: dict


def split_variables(variables: PyTree) -> tuple[PyTree, dict[str, PyTree]]:
  """Flax variables -> (params, {other collection: value}), the latter as a plain dict."""
  variables = flax.core.unfreeze(variables)
  params = variables.pop('params')
  return params, dict(variables)


def ema_update(ema: PyTree, new: PyTree, decay: float | jax.Array) -> PyTree:
  """decay * ema + (1 - decay) * new on every floating leaf (others copied from `new`)."""
  def upd(e, n):
    if jnp.issubdtype(jnp.asarray(n).dtype, jnp.floating):
      return decay * e + (1.0 - decay) * n
    return n
  return jax.tree.map(upd, ema, new)


def adam(lr: float | optax.Schedule, b1: float, b2: float,
         weight_decay: float) -> optax.GradientTransformation:
  """Adam(b1, b2) with decoupled weight decay (AdamW): OASIS (wd 0, constant lr) and the
  head-avatar backbone (wd 1e-2, cosine schedule)."""
  return optax.adamw(lr, b1=b1, b2=b2, eps=1e-8, weight_decay=weight_decay)


def per_copy(fn: Callable[..., Any], *stacked: PyTree) -> Any:
  """`fn` over the leading axis of stacked pytrees (one discriminator copy per exit), one copy
  after the other, unrolled; outputs stacked again. Not `vmap`: batching over conv *weights*
  turns every conv into a grouped convolution, and XLA:CPU is ~20x slower on those; nor
  `lax.map`, whose weight gradients inside the loop were as slow (`bench/xla_cpu_paths.py`:
  fwd + bwd of 4 OASIS discriminator copies, 10.9 s vmapped, 13.1 s lax.map, 0.57 s unrolled)."""
  n = jax.tree.leaves(stacked)[0].shape[0]
  outs = [fn(*jax.tree.map(lambda a, i=i: a[i], stacked)) for i in range(n)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

"""The exit-quality predictor as trained and routed: the backbone's net (Table S7), optionally
on standardised targets (config.predictor.target_norm).

With target_norm the net learns (LPIPS - mean) / std per exit, mean and std taken from the
training rows, and predicts `net(x) * std + mean`. The two vectors live in the params
('target_mean', 'target_std', beside the net's 'net'), so a checkpoint carries them and every
consumer (the sweep, the routed program) applies the same function; the optimiser never moves
them (`frozen_labels`). Why: LPIPS targets sit in a narrow band (demo: mean 0.06-0.09, std
~0.015 per exit); a net that starts at output ~0 spends its steps learning the offset, and the
paper's SGD + MSE (Eq. S2) on raw targets ended *worse* than predicting the training mean
(README, "Predictor, routing and inference").
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fiancee_jax.core.interface import Backbone

FROZEN = ('target_mean', 'target_std')
STD_FLOOR = 1e-6   # a constant target column: predicted as its mean, its residual unscaled
PyTree = Any


class TargetNorm(nn.Module):
  """`net(x) * target_std + target_mean` (per exit); identity stats at init."""
  net: nn.Module
  num_exits: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    mean = self.param('target_mean', nn.initializers.zeros, (self.num_exits,))
    std = self.param('target_std', nn.initializers.ones, (self.num_exits,))
    return self.net(x) * std + mean


def model(backbone: Backbone) -> nn.Module:
  """The predictor module of `backbone.config` (the one `train.py --stage=predictor` trains)."""
  net = backbone.predictor()
  if backbone.config.predictor.target_norm:
    return TargetNorm(net, len(backbone.exits))
  return net


def set_target_stats(params: PyTree, targets: np.ndarray) -> PyTree:
  """`params` of a `TargetNorm` model with mean / std of the training targets (N, E)."""
  targets = np.asarray(targets, np.float32)
  out = dict(params)
  out['target_mean'] = jnp.asarray(targets.mean(0), jnp.float32)
  out['target_std'] = jnp.asarray(np.maximum(targets.std(0), STD_FLOOR), jnp.float32)
  return out


def residual_scale(params: PyTree) -> jax.Array | float:
  """What the loss divides residuals by: each exit's training std (1 without target_norm), so
  the loss weighs every exit alike whatever its LPIPS spread."""
  return params['target_std'] if 'target_std' in params else 1.0


def frozen_labels(params: PyTree) -> PyTree:
  """optax.multi_transform labels: 'frozen' for the target stats, 'fit' for the net."""
  return {k: jax.tree_util.tree_map(lambda _, k=k: 'frozen' if k in FROZEN else 'fit', v)
          for k, v in params.items()}

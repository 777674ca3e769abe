"""Quality predictors (paper Sec. 3.2, Table S7): per input, the LPIPS each exit would reach.

OASIS: a conv + ResBlock on the early backbone features (the map after the first conv and
ResBlock 1, the same map the bank keys come from), flattened, then an MLP. At the paper size
the conv is 3x3, stride 2, VALID on the 8x16x1024 map -> 3x7x512 = 10752 features, which is
Table S7's flatten width (58M parameters, ~250M MACs). Small configs whose key grid is below
3x3 use SAME padding (`conv_padding`).

MegaPortraits: an MLP with LeakyReLU on the driver's motion keys (3 angles ++ expression).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class OASISPredictor(nn.Module):
  """Table S7 (OASIS): Conv2D+ReLU, ResBlock, Flatten, Linear+ReLU x4, Linear -> exits."""
  num_exits: int                  # one predicted LPIPS per exit branch
  conv_channels: int = 512        # Table S7: (1024, 512)
  mlp: Sequence[int] = (4096, 1024, 512, 128)
  conv_padding: str = 'VALID'     # 'VALID' at the paper size (8x16 -> 3x7), 'SAME' on tiny grids

  @nn.compact
  def __call__(self, feat: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(self.conv_channels, (3, 3), strides=2, padding=self.conv_padding,
                        name='conv')(feat))
    y = nn.Conv(self.conv_channels, (3, 3), padding='SAME', name='res_conv1')(nn.relu(x))
    y = nn.Conv(self.conv_channels, (3, 3), padding='SAME', name='res_conv2')(nn.relu(y))
    x = (x + y).reshape(x.shape[0], -1)
    for i, width in enumerate(self.mlp):
      x = nn.relu(nn.Dense(width, name=f'fc{i}')(x))
    return nn.Dense(self.num_exits, name='out')(x)


class MotionPredictor(nn.Module):
  """Table S7 (MegaPortraits): Linear + LeakyReLU stack on the driver's motion keys."""
  num_exits: int
  mlp: Sequence[int] = (512, 256, 128, 64)

  @nn.compact
  def __call__(self, keys: jax.Array) -> jax.Array:
    x = keys.reshape(keys.shape[0], -1)
    for i, width in enumerate(self.mlp):
      x = nn.leaky_relu(nn.Dense(width, name=f'fc{i}')(x), 0.2)
    return nn.Dense(self.num_exits, name='out')(x)


def from_config(config) -> nn.Module:
  """The predictor of `config.backbone` with one output per configured exit."""
  num_exits = len(config.branches.exits)
  p = config.predictor
  if config.backbone == 'oasis':
    grid = (config.data.height // 32, config.data.width // 32)
    padding = 'VALID' if min(grid) >= 3 else 'SAME'
    return OASISPredictor(num_exits=num_exits, conv_channels=p.conv_channels,
                          mlp=tuple(p.mlp), conv_padding=padding)
  return MotionPredictor(num_exits=num_exits, mlp=tuple(p.mlp))


def loss_fn(pred: jax.Array, target: jax.Array, kind: str) -> jax.Array:
  """MSE (OASIS, Eq. S2) or MAE (MegaPortraits, S1.2.2) between predicted and true LPIPS."""
  if kind == 'mse':
    return jnp.mean((pred - target) ** 2)
  if kind == 'mae':
    return jnp.mean(jnp.abs(pred - target))
  raise ValueError(f"predictor loss {kind!r}: expected 'mse' or 'mae'")

"""MegaPortraits's FIANCEE parts: the G2D exit branch block (Table S9) and the predictor on the
driver's motion keys (Table S7, S1.2.2).

Branch: ResBlock2D blocks mirroring G2D's remaining blocks at scaled widths
(`fiancee_jax.core.branches`). Guided by the frame bank (S1.2.1): the retrieved RGB frame,
bilinearly resized, is concatenated to the input of every branch block (+3 channels, Table S9
caption).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fiancee_jax.backbones.megaportraits.model import (ResBlock2D, downsample_bilinear,
                                                       to_image, upsample_bilinear2x)
from fiancee_jax.core.branches import BranchSpec

Dtype = Any
FRAME_CHANNELS = 3   # the bank's RGB frame concatenated to every G2D branch block input


class G2DBranch(nn.Module):
  """ResBlock2D branch of G2D (Table S9); input = backbone block k output. Each block:
  bilinear x2 where the spec says so, [++ bank frame resized to that resolution], ResBlock2D;
  then G2D's head (ReLU, conv3x3, tanh). G2D has no conditioning map (ctx is None)."""
  spec: BranchSpec
  use_bank: bool = True
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, ctx: Any = None, frame: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    del ctx
    if self.use_bank and (frame is None or frame.ndim != 4
                          or frame.shape[-1] != FRAME_CHANNELS):
      got = None if frame is None else tuple(frame.shape)
      raise ValueError(f'G2DBranch(use_bank=True): expected the bank frame (B, H, W, 3), '
                       f'got {got}')
    for i, b in enumerate(self.spec):
      if b.upsample == 'bilinear':
        x = upsample_bilinear2x(x)
      elif b.upsample is not None:
        raise ValueError(f'G2DBranch block {i}: upsample={b.upsample!r}, expected bilinear')
      fin = b.fin
      if self.use_bank:  # Table S9 caption: +3 input channels in every block
        g = downsample_bilinear(frame, x.shape[1:3]).astype(x.dtype)
        x = jnp.concatenate([x, g], axis=-1)
        fin += FRAME_CHANNELS
      x = ResBlock2D(fin, b.fout, self.axis_name, self.dtype, name=f'block_{i}')(x, train)
    return to_image(nn.Conv(3, (3, 3), padding=1, dtype=self.dtype, name='out_conv'), x)


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

"""OASIS's FIANCEE parts: the exit branch block (Table S8) and the quality predictor (Table S7).

Branch: SPADE-ResBlocks mirroring the generator's remaining blocks at scaled widths
(`fiancee_jax.core.branches`). Guided by the bank (Sec. 3.3): the glued value map (after
ResBlock 3) is passed through a conv3x3 at its own resolution to fin/2 channels,
nearest-resized to the branch input and concatenated, so the first block's input is fin x 1.5
(Table S8 caption).

Predictor: a conv + ResBlock on the early backbone features (the map after the first conv and
ResBlock 1, the same map the bank keys come from), flattened, then an MLP. At the paper size
the conv is 3x3, stride 2, VALID on the 8x16x1024 map -> 3x7x512 = 10752 features, which is
Table S7's flatten width (58M parameters, ~250M MACs). Small configs whose key grid is below
3x3 use SAME padding (`conv_padding`).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fiancee_jax.core.branches import BranchSpec
from fiancee_jax.nn.layers import SNConv, SPADEResBlock, nearest_down, up2

Dtype = Any


class OASISBranch(nn.Module):
  """SPADE-ResBlock branch; input = backbone block k output (before its upsampling), ctx =
  the generator's conditioning map."""
  spec: BranchSpec
  spade_hidden: int = 128
  use_bank: bool = True
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array, guide: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    if self.use_bank and guide is None:
      raise ValueError('OASISBranch(use_bank=True) needs the guide feature from the bank')
    for i, b in enumerate(self.spec):
      if b.upsample:
        x = up2(x)
      fin = b.fin
      if i == 0 and self.use_bank:
        g = SNConv(b.fin // 2, 3, spectral_norm=False, dtype=self.dtype, name='guide_conv')(guide)
        g = _nearest_resize(g, x.shape[1:3]).astype(x.dtype)
        x = jnp.concatenate([x, g], axis=-1)
        fin = b.fin + b.fin // 2
      x = SPADEResBlock(fin, b.fout, self.spade_hidden, axis_name=self.axis_name,
                        dtype=self.dtype, name=f'body_{i}')(x, cond, train)
    x = SNConv(3, 3, spectral_norm=False, dtype=self.dtype, name='conv_img')(
        nn.leaky_relu(x, 0.2))
    return jnp.tanh(x.astype(jnp.float32))


def _nearest_resize(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Nearest resize by integer factors: strided slicing down, repeat up."""
  h, w = int(size[0]), int(size[1])
  if x.shape[1] >= h:
    return nearest_down(x, (h, w))
  fy, fx = h // x.shape[1], w // x.shape[2]
  return jnp.repeat(jnp.repeat(x, fy, axis=1), fx, axis=2)


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

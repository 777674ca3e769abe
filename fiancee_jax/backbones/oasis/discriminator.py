"""OASIS U-Net discriminator (boschresearch/OASIS models/discriminator.py), per-pixel N+1 logits.

6 residual down blocks (avg-pool) + 6 residual up blocks (nearest x2) with skip concatenation
of the encoder outputs; spectral norm on every conv but the final 1x1 to N+1 classes
(class 0 = fake). No normalization layers: collections 'params' and 'spectral' only.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from fiancee_jax.nn.layers import SNConv, avg_pool2, up2

Dtype = Any


class ResBlockD(nn.Module):
  """OASIS residual_block_D. up_or_down: -1 avg-pool down, +1 nearest up. `first`: no lrelu
  before conv1 and the shortcut pools before its 1x1 conv. Learned shortcut when fin != fout."""
  fin: int
  fout: int
  up_or_down: int
  first: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = lambda f, k, name: SNConv(f, k, dtype=self.dtype, name=name)
    learned = self.fin != self.fout
    # shortcut
    x_s = x
    if self.first:
      if self.up_or_down < 0:
        x_s = avg_pool2(x_s)
      if learned:
        x_s = conv(self.fout, 1, 'conv_s')(x_s, train)
    else:
      if self.up_or_down > 0:
        x_s = up2(x_s)
      if learned:
        x_s = conv(self.fout, 1, 'conv_s')(x_s, train)
      if self.up_or_down < 0:
        x_s = avg_pool2(x_s)
    # main path
    dx = x
    if not self.first:
      dx = nn.leaky_relu(dx, 0.2)
      if self.up_or_down > 0:
        dx = up2(dx)
    dx = conv(self.fout, 3, 'conv1')(dx, train)
    dx = conv(self.fout, 3, 'conv2')(nn.leaky_relu(dx, 0.2), train)
    if self.up_or_down < 0:
      dx = avg_pool2(dx)
    return x_s + dx


class OASISDiscriminator(nn.Module):
  """U-Net discriminator: image (B,H,W,3) -> logits (B,H,W,num_classes+1), feats with
  'down{i}' / 'up{i}' block outputs (i = 1..6). H, W multiples of 64."""
  num_classes: int
  channels: Sequence[int] = (3, 128, 128, 256, 256, 512, 512)
  axis_name: str | None = None  # unused (no batch norm); kept for a uniform model API
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    c = tuple(self.channels)
    n = len(c) - 1
    if image.ndim != 4 or image.shape[-1] != c[0]:
      raise ValueError(f'discriminator image: expected (batch, H, W, {c[0]}), got {image.shape}')
    if image.shape[1] % 2 ** n or image.shape[2] % 2 ** n:
      raise ValueError(f'discriminator image: H, W must be multiples of {2 ** n}, '
                       f'got {image.shape[1]}x{image.shape[2]}')
    feats, skips = {}, []
    x = image
    for i in range(n):
      x = ResBlockD(c[i], c[i + 1], -1, first=(i == 0), dtype=self.dtype,
                    name=f'body_down_{i}')(x, train)
      skips.append(x)
      feats[f'down{i + 1}'] = x
    ups = [(c[-1], c[-2])] + [(2 * c[-1 - i], c[-2 - i]) for i in range(1, n - 1)] + [
        (2 * c[1], 64)]
    for i, (fin, fout) in enumerate(ups):
      if i > 0:
        x = jnp.concatenate([skips[-i - 1], x], axis=-1)
      x = ResBlockD(fin, fout, 1, dtype=self.dtype, name=f'body_up_{i}')(x, train)
      feats[f'up{i + 1}'] = x
    logits = SNConv(self.num_classes + 1, 1, spectral_norm=False, dtype=self.dtype,
                    name='layer_up_last')(x)
    return logits.astype(jnp.float32), feats


def from_config(config) -> OASISDiscriminator:
  """Discriminator of an OASIS experiment config."""
  return OASISDiscriminator(num_classes=config.data.num_classes,
                            channels=tuple(config.disc.channels),
                            dtype=jnp.dtype(config.dtype))

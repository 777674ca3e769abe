"""Multi-scale patch discriminator (pix2pixHD [93]), as MegaPortraits and FIANCEE's head
branches use (S1.2.2).

`num_scales` PatchGANs, each on the image average-pooled once more than the previous one
(3x3, stride 2, pad 1, padding not counted -- pix2pixHD's `AvgPool2d(..., count_include_pad=
False)`). A PatchGAN: conv4x4/2 + LReLU(0.2), (num_layers - 1) x [conv4x4/2 + InstanceNorm +
LReLU] doubling width (max 512), conv4x4/1 + InstanceNorm + LReLU, conv4x4/1 -> 1 logit per
patch. Returns per-scale logits and every scale's intermediate activations (for feature
matching).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from fiancee_jax.nn import layers

Dtype = Any
Array = jax.Array


def avg_pool_3x3_s2(x: Array) -> Array:
  """3x3 / stride 2 / pad 1 average pool that ignores the padding (count_include_pad=False)."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 2, 2, 1), pad)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 2, 2, 1), pad)
  return total / count


class PatchGAN(nn.Module):
  """pix2pixHD NLayerDiscriminator: (B, H, W, C) -> (logits (B, h, w, 1), [activations])."""
  ch: int = 64          # width of the first layer
  num_layers: int = 3   # stride-2 layers
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, list[Array]]:
    conv = lambda c, s, name: layers.Conv(c, (4, 4), strides=s, padding=2, dtype=self.dtype,
                                          name=name)
    norm = lambda name: nn.InstanceNorm(epsilon=1e-5, use_scale=False, use_bias=False,
                                        dtype=self.dtype, name=name)
    feats = []
    h = nn.leaky_relu(conv(self.ch, 2, 'conv_0')(x.astype(self.dtype)), 0.2)
    feats.append(h)
    c = self.ch
    for i in range(1, self.num_layers + 1):
      c = min(2 * c, 512)
      stride = 2 if i < self.num_layers else 1
      h = nn.leaky_relu(norm(f'norm_{i}')(conv(c, stride, f'conv_{i}')(h)), 0.2)
      feats.append(h)
    logits = conv(1, 1, 'conv_out')(h).astype(jnp.float32)
    return logits, feats


class MultiScalePatchDiscriminator(nn.Module):
  """`num_scales` PatchGANs on successively avg-pooled images.

  Returns (logits: list per scale, {'feats': list per scale of lists of activations})."""
  ch: int = 64
  num_scales: int = 2
  num_layers: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[list[Array], dict[str, list[list[Array]]]]:
    if x.ndim != 4:
      raise ValueError(f'discriminator input: expected (B, H, W, C), got {tuple(x.shape)}')
    logits, feats = [], []
    for s in range(self.num_scales):
      if s:
        x = avg_pool_3x3_s2(x)
      out, f = PatchGAN(self.ch, self.num_layers, self.dtype, name=f'scale_{s}')(x)
      logits.append(out)
      feats.append(f)
    return logits, {'feats': feats}


def from_config(config) -> MultiScalePatchDiscriminator:
  """Discriminator from a `base_megaportraits()` config (config.disc, config.dtype)."""
  d = config.disc
  dtype = jnp.bfloat16 if config.dtype == 'bfloat16' else jnp.float32
  return MultiScalePatchDiscriminator(ch=d.ch, num_scales=d.num_scales,
                                      num_layers=d.num_layers, dtype=dtype)

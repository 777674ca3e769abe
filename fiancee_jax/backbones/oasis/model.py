"""OASIS generator (Schonfeld et al. 2021), the FIANCEE backbone on Cityscapes (Sec. 4.1).

Layout of boschresearch/OASIS models/generator.py (parameter names mirror its state_dict:
fc, body_{i}.{conv_0,conv_1,conv_s,norm_0,norm_1,norm_s}, conv_img):
  cond = [z broadcast (z_dim) ++ one-hot (num_classes)]          (99 ch on Cityscapes)
  x = fc(nearest_down(cond, H/32 x W/32))                         conv3x3, bias, no SN
  6 x SPADEResBlock(widths[i] -> widths[i+1]) conditioned on cond, nearest x2 after 1..5
  image = tanh(conv_img(lrelu(x)))
At 256x512, 35 classes, ch=64: 71.11M params, 318.6 GMACs (tests/test_flops.py).

Exit branches tap `feats['block{k}']` (output of ResBlock k before its upsampling) and use
`run_blocks` to continue from a shared prefix.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from fiancee_jax.config import oasis_widths
from fiancee_jax.nn.layers import SNConv, SPADEResBlock, nearest_down, up2

NUM_BLOCKS = 6
Dtype = Any


def widths(ch: int) -> tuple[int, ...]:
  """Generator widths: fc output, then each ResBlock's output ([16,16,16,8,4,2,1] x ch)."""
  return oasis_widths(ch)


def validate_inputs(seg: Any, num_classes: int, height: int, width: int) -> jax.Array:
  """Check a label map and return it as a float one-hot (B, H, W, num_classes).

  `seg`: integer label ids (B, H, W) or a one-hot / soft map (B, H, W, num_classes).
  Raises ValueError naming the problem (wrong rank/size/channels, ids out of range). Value
  checks run only on concrete arrays (inside jit only the shape is checked).
  """
  shape = tuple(seg.shape)
  is_ids = jnp.issubdtype(seg.dtype, jnp.integer) or seg.dtype == jnp.bool_
  if is_ids and len(shape) == 4 and shape[-1] == 1:
    seg, shape = seg[..., 0], shape[:-1]
  if is_ids:
    if len(shape) != 3:
      raise ValueError(f'label ids: expected shape (batch, {height}, {width}), got {shape}')
  elif len(shape) != 4 or shape[-1] != num_classes:
    raise ValueError(f'label map: expected one-hot shape (batch, {height}, {width}, '
                     f'{num_classes}) or integer ids (batch, {height}, {width}), got {shape} '
                     f'{seg.dtype}')
  if shape[1:3] != (height, width):
    raise ValueError(f'label map: spatial size {shape[1]}x{shape[2]} does not match the '
                     f'generator resolution {height}x{width}')
  if is_ids:
    if not isinstance(seg, jax.core.Tracer):
      ids = np.asarray(seg)
      if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(f'label ids: values must be in [0, {num_classes}), got range '
                         f'[{ids.min()}, {ids.max()}]')
    return jax.nn.one_hot(seg, num_classes, dtype=jnp.float32)
  return jnp.asarray(seg, jnp.float32)


class Generator(nn.Module):
  """OASIS generator. Collections: 'params', 'batch_stats', 'spectral' (see layers.py);
  train-mode apply needs mutable=['batch_stats', 'spectral'] and, when z is None, an rng
  'noise' (OASIS samples z inside forward)."""
  num_classes: int              # semantic channels (35 on Cityscapes)
  height: int                   # output resolution, multiples of 32
  width: int
  ch: int = 64                  # OASIS channels_G
  z_dim: int = 64               # 3D noise channels (0: no noise)
  spade_hidden: int = 128       # SPADE shared-conv width
  axis_name: str | None = None  # data-parallel axis for sync batch norm
  dtype: Dtype = jnp.float32    # compute dtype
  remat: bool = False           # nn.remat the SPADE-ResBlocks (same params; train.remat)

  def setup(self):
    if self.height % 32 or self.width % 32:
      raise ValueError(f'Generator: resolution {self.height}x{self.width} must be multiples '
                       'of 32 (5 nearest x2 upsamplings)')
    w = widths(self.ch)
    self.fc = SNConv(w[0], 3, spectral_norm=False, dtype=self.dtype)
    # remat: each block's activations are recomputed in the backward pass instead of kept
    # (arg 3 of __call__(self, x, seg, train) is static); names and params are unchanged.
    block = nn.remat(SPADEResBlock, static_argnums=(3,)) if self.remat else SPADEResBlock
    self.body = [block(w[i], w[i + 1], self.spade_hidden, axis_name=self.axis_name,
                       dtype=self.dtype) for i in range(NUM_BLOCKS)]
    self.conv_img = SNConv(3, 3, spectral_norm=False, dtype=self.dtype)

  def make_cond(self, seg: jax.Array, z: jax.Array | None = None) -> jax.Array:
    """The 99-ch conditioning map [z broadcast ++ one-hot] (z first, as OASIS cat((z, seg)));
    `seg` ids or one-hot (validated); z None -> sampled from rng 'noise'."""
    onehot = validate_inputs(seg, self.num_classes, self.height, self.width)
    if self.z_dim == 0:
      return onehot.astype(self.dtype)
    b = onehot.shape[0]
    if z is None:
      z = jax.random.normal(self.make_rng('noise'), (b, self.z_dim), jnp.float32)
    if z.shape != (b, self.z_dim):
      raise ValueError(f'z: expected shape ({b}, {self.z_dim}), got {tuple(z.shape)}')
    zmap = jnp.broadcast_to(z[:, None, None, :], (b, self.height, self.width, self.z_dim))
    return jnp.concatenate([zmap.astype(jnp.float32), onehot], axis=-1).astype(self.dtype)

  def stem(self, cond: jax.Array) -> jax.Array:
    """First layer: nearest-downsample cond to H/32 x W/32, conv3x3 (feats['fc'])."""
    return self.fc(nearest_down(cond, (self.height // 32, self.width // 32)))

  def run_blocks(self, x: jax.Array, cond: jax.Array, start: int, stop: int,
                 train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Run ResBlocks start+1..stop (1-based) from x = output of block `start` before its
    upsampling (start 0: the fc output). Returns block `stop`'s output (before upsampling)
    and {'block{k}': ...} for the blocks run."""
    if not 0 <= start <= stop <= NUM_BLOCKS:
      raise ValueError(f'run_blocks: expected 0 <= start <= stop <= {NUM_BLOCKS}, '
                       f'got start={start}, stop={stop}')
    feats = {}
    for k in range(start + 1, stop + 1):
      if k > 1:
        x = up2(x)
      x = self.body[k - 1](x, cond, train)
      feats[f'block{k}'] = x
    return x, feats

  def head(self, x: jax.Array) -> jax.Array:
    """Output layer: tanh(conv3x3(lrelu(x, 0.2))), image in [-1, 1]."""
    return jnp.tanh(self.conv_img(nn.leaky_relu(x, 0.2)).astype(jnp.float32))

  def __call__(self, seg: jax.Array, z: jax.Array | None = None,
               train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    cond = self.make_cond(seg, z)
    x = self.stem(cond)
    feats = {'fc': x}
    x, blocks = self.run_blocks(x, cond, 0, NUM_BLOCKS, train)
    feats.update(blocks)
    return self.head(x), feats


def from_config(config, axis_name: str | None = None) -> Generator:
  """Build the generator of an OASIS experiment config (config.model / config.data)."""
  m, d = config.model, config.data
  return Generator(num_classes=d.num_classes, height=d.height, width=d.width, ch=m.ch,
                   z_dim=m.z_dim, spade_hidden=m.spade_hidden, axis_name=axis_name,
                   dtype=jnp.dtype(config.dtype), remat=bool(config.train.get('remat', False)))

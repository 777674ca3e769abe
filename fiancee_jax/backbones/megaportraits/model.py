"""MegaPortraits-style head-avatar backbone: appearance + motion encoders, fusion, G2D.

G2D (Sec. 4.2, S1.2.1, Table S9) is MegaPortraits' 2D decoder: a 1x1 conv to `ch` at the
base resolution (H/8), `num_res` ResBlock2D(ch), then 3 x [bilinear x2 + ResBlock2D]
ch -> up_channels, then ReLU, conv3x3 -> 3, tanh. FIANCEE's backbone modules l_1..l_9 are
its 9 ResBlock2Ds; exit branches attach after blocks 2, 4, 6.

ResBlock2D (Table S9 caption): BN, h-swish, conv3x3, BN, h-swish, conv3x3, plus a 1x1 conv
skip. The 1x1 skip is used only when fin != fout (identity otherwise): that is the variant
that matches the paper's totals at 512x512 from a 64x64x1536 input -- 31.62M params and
213.1 GMACs; a 1x1 skip in every block gives 33.19M / 219.5 GMACs (tests check both).

The front end is ours and much smaller than MegaPortraits' (no volumetric encoder, no 3D
warping, no G3D): an `AppearanceEncoder` (source -> features at H/8), a `MotionEncoder`
(driver -> 3 head angles in degrees + an expression vector, used as bank keys and predictor
input), and a `Fusion` that turns both into G2D's input: the motion code is decoded to a
coarse 4x4 spatial map (upsampled to H/8 and concatenated to the appearance features), a
1x1 conv projects to `g2d_in`, and the motion code modulates every channel (FiLM).
A learned pose warp of the appearance features is out of scope.

GMAC routes for `python -m fiancee_jax.metrics.flops`: 'backbone' (G2D) and, for each Table S9
SF with the bank off and on, 'exit{k}' = G2D input conv + blocks 1..k + branch k (Table 2).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from fiancee_jax.nn.layers import SyncBatchNorm

Dtype = Any
Array = jax.Array



def hswish(x: Array) -> Array:
  """h-swish (MobileNetV3): x * relu6(x + 3) / 6."""
  return x * jax.nn.relu6(x + 3.0) / 6.0


def _up_axis(x: Array, axis: int) -> Array:
  # Bilinear x2 along one axis, half-pixel centres (PyTorch align_corners=False):
  # out[2i] = .75 x[i] + .25 x[i-1], out[2i+1] = .75 x[i] + .25 x[i+1], edges clamped.
  n = x.shape[axis]
  prev = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis),
                          jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
  nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis),
                         jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)
  even = 0.75 * x + 0.25 * prev
  odd = 0.75 * x + 0.25 * nxt
  out = jnp.stack([even, odd], axis=axis + 1)
  shape = list(x.shape)
  shape[axis] = 2 * n
  return out.reshape(shape)


def upsample_bilinear2x(x: Array) -> Array:
  """(B, H, W, C) -> (B, 2H, 2W, C), bilinear, identical to PyTorch
  `F.interpolate(scale_factor=2, mode='bilinear', align_corners=False)`.

  Written with shifts and adds (no matmul) so a MAC counter sees no work here, as the
  paper's count (conv/linear layers only) does."""
  return _up_axis(_up_axis(x, 1), 2)


def _down_axis(x: Array, factor: int, axis: int) -> Array:
  # Bilinear /factor along one axis, half-pixel centres, no antialias (PyTorch
  # align_corners=False): output i samples input i*f + (f-1)/2, i.e. one pixel for odd f,
  # the mean of the two middle pixels of each f-window for even f.
  if factor == 1:
    return x
  a = jax.lax.slice_in_dim(x, (factor - 1) // 2, None, factor, axis)
  if factor % 2:
    return a
  b = jax.lax.slice_in_dim(x, factor // 2, None, factor, axis)
  return 0.5 * (a + b)


def downsample_bilinear(x: Array, size: Sequence[int]) -> Array:
  """(B, H, W, C) -> (B, h, w, C) for integer factors H/h, W/w, identical to PyTorch
  `F.interpolate(size=(h, w), mode='bilinear', align_corners=False)` (no antialias).

  Strided slices and adds (no matmul, like `upsample_bilinear2x`): used to bring the bank's
  RGB frame to each G2D branch block's resolution (Table S9 caption)."""
  h, w = int(size[0]), int(size[1])
  H, W = x.shape[1], x.shape[2]
  if h < 1 or w < 1 or H % h or W % w:
    raise ValueError(f'downsample_bilinear: {H}x{W} -> {h}x{w}: expected a target size that '
                     'divides the input size')
  return _down_axis(_down_axis(x, H // h, 1), W // w, 2)


def to_image(out_conv: nn.Module, x: Array) -> Array:
  """G2D's output head (shared with its exit branches): ReLU, `out_conv` (conv3x3 -> 3),
  tanh; float32 image in [-1, 1]."""
  return jnp.tanh(out_conv(nn.relu(x))).astype(jnp.float32)


def _check_image(x: Array, name: str, multiple: int = 8) -> None:
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f'{name}: expected images of shape (B, H, W, 3), got {tuple(x.shape)}')
  if x.shape[1] % multiple or x.shape[2] % multiple:
    raise ValueError(f'{name}: height and width must be multiples of {multiple} '
                     f'(G2D works from H/8), got {x.shape[1]}x{x.shape[2]}')


def _bn(axis_name: str | None, name: str) -> SyncBatchNorm:
  # The OASIS models' sync batch norm (torch BatchNorm2d semantics: momentum 0.1, eps 1e-5,
  # statistics in float32, averaged over the data-parallel axis), here with affine params.
  return SyncBatchNorm(affine=True, axis_name=axis_name, name=name)


class ResBlock2D(nn.Module):
  """BN, h-swish, conv3x3, BN, h-swish, conv3x3 + skip (1x1 conv iff fin != fout). Table S9."""
  fin: int                      # input channels (branches add 3 for the bank frame)
  fout: int                     # output channels
  axis_name: str | None = None  # data-parallel axis for sync BN statistics
  dtype: Dtype = jnp.float32    # compute dtype (params stay float32)

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    if x.shape[-1] != self.fin:
      raise ValueError(f'ResBlock2D({self.fin}->{self.fout}): input has {x.shape[-1]} '
                       f'channels, expected {self.fin}')
    h = _bn(self.axis_name, 'norm_0')(x, train)
    h = nn.Conv(self.fout, (3, 3), padding=1, dtype=self.dtype, name='conv_0')(hswish(h))
    h = _bn(self.axis_name, 'norm_1')(h, train)
    h = nn.Conv(self.fout, (3, 3), padding=1, dtype=self.dtype, name='conv_1')(hswish(h))
    if self.fin != self.fout:
      x = nn.Conv(self.fout, (1, 1), dtype=self.dtype, name='conv_s')(x)
    return h + x.astype(h.dtype)


class G2D(nn.Module):
  """MegaPortraits 2D decoder: 9 ResBlock2Ds (the FIANCEE backbone modules l_1..l_9).

  `__call__` returns (image float32 in [-1, 1], feats) with feats['input'] (after the 1x1
  conv) and feats['block1'..'block9']. `run_blocks(x, start, stop, train)` applies blocks
  start+1..stop to the output of block `start` (0 = feats['input']); blocks after the
  `num_res` base-resolution ones upsample x2 first. `head(x)` = ReLU, conv3x3, tanh.
  """
  in_ch: int = 1536                             # input channels at base resolution
  ch: int = 512                                 # width of the base-resolution blocks
  num_res: int = 6                              # ResBlock2D(ch) at base resolution
  up_channels: Sequence[int] = (256, 128, 64)   # widths of the upsampling blocks
  axis_name: str | None = None
  dtype: Dtype = jnp.float32
  remat: bool = False                           # nn.remat the ResBlock2Ds (same params)

  @property
  def num_blocks(self) -> int:
    return self.num_res + len(self.up_channels)

  def setup(self):
    self.stem = nn.Conv(self.ch, (1, 1), dtype=self.dtype, name='stem')
    widths = [self.ch] * (self.num_res + 1) + list(self.up_channels)
    # remat: activations recomputed in the backward pass (arg 2 of __call__(self, x, train)
    # static); names and params unchanged.
    block = nn.remat(ResBlock2D, static_argnums=(2,)) if self.remat else ResBlock2D
    self.blocks = [block(widths[i], widths[i + 1], self.axis_name, self.dtype,
                         name=f'block{i + 1}') for i in range(self.num_blocks)]
    self.out_conv = nn.Conv(3, (3, 3), padding=1, dtype=self.dtype, name='out_conv')

  def input_conv(self, x: Array) -> Array:
    """The 1x1 conv in_ch -> ch (its output is feats['input'])."""
    if x.ndim != 4 or x.shape[-1] != self.in_ch:
      raise ValueError(f'G2D input: expected (B, h, w, {self.in_ch}), got {tuple(x.shape)}')
    return self.stem(x.astype(self.dtype))

  def run_blocks(self, x: Array, start: int, stop: int, train: bool = False) -> Array:
    """Blocks start+1..stop (1-based) applied to the output of block `start`."""
    if not 0 <= start <= stop <= self.num_blocks:
      raise ValueError(f'G2D.run_blocks: expected 0 <= start <= stop <= {self.num_blocks}, '
                       f'got start={start}, stop={stop}')
    for i in range(start, stop):
      if i >= self.num_res:
        x = upsample_bilinear2x(x)
      x = self.blocks[i](x, train)
    return x

  def head(self, x: Array) -> Array:
    """ReLU, conv3x3 -> 3, tanh; float32 image."""
    return to_image(self.out_conv, x)

  def __call__(self, x: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
    x = self.input_conv(x)
    feats = {'input': x}
    for k in range(1, self.num_blocks + 1):
      x = self.run_blocks(x, k - 1, k, train)
      feats[f'block{k}'] = x
    return self.head(x), feats


class AppearanceEncoder(nn.Module):
  """Source image (B, H, W, 3) -> features (B, H/8, W/8, 8*enc_ch): conv3x3, 3 strided
  conv3x3 + BN + ReLU downsamplings (x2 width each), one ResBlock2D. Ours, not the paper's."""
  enc_ch: int = 64
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    h = nn.Conv(self.enc_ch, (3, 3), padding=1, dtype=self.dtype, name='conv_in')(
        x.astype(self.dtype))
    c = self.enc_ch
    for i in range(3):
      c *= 2
      h = _bn(self.axis_name, f'norm_{i}')(h, train)
      h = nn.Conv(c, (3, 3), strides=2, padding=1, dtype=self.dtype, name=f'down_{i}')(
          nn.relu(h))
    return ResBlock2D(c, c, self.axis_name, self.dtype, name='res')(h, train)


class MotionEncoder(nn.Module):
  """Driver image -> (angles (B, 3) yaw/pitch/roll in degrees, bounded to (-90, 90),
  expression (B, expr_dim)). 4 strided conv3x3 + BN + ReLU (to H/16), global average
  pool, MLP. Ours; MegaPortraits uses a pretrained head-pose regressor + ResNet-18."""
  motion_ch: int = 32
  expr_dim: int = 512
  hidden: int = 256
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> tuple[Array, Array]:
    h = x.astype(self.dtype)
    c = self.motion_ch
    for i in range(4):
      h = nn.Conv(c, (3, 3), strides=2, padding=1, dtype=self.dtype, name=f'down_{i}')(h)
      h = _bn(self.axis_name, f'norm_{i}')(h, train)
      h = nn.relu(h)
      c *= 2
    h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
    h = nn.relu(nn.Dense(self.hidden, name='fc')(h))
    angles = 90.0 * jnp.tanh(nn.Dense(3, name='angles')(h))
    expression = nn.Dense(self.expr_dim, name='expression')(h)
    return angles, expression


class Fusion(nn.Module):
  """Appearance features + motion code -> G2D input (B, h, w, out_ch).

  The code goes through an MLP; it is decoded to a 4x4 map (bilinear to h x w) that is
  concatenated to the appearance features, a 1x1 conv projects to out_ch, and the code
  modulates each channel: x * (1 + gamma) + beta (FiLM). No spatial warp (out of scope)."""
  out_ch: int = 1536
  map_ch: int = 256      # channels of the decoded motion map
  hidden: int = 512
  grid: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, appearance: Array, code: Array) -> Array:
    b, h, w, _ = appearance.shape
    m = nn.relu(nn.Dense(self.hidden, name='mlp')(code.astype(jnp.float32)))
    spatial = nn.Dense(self.grid * self.grid * self.map_ch, name='to_map')(m)
    spatial = spatial.reshape(b, self.grid, self.grid, self.map_ch)
    spatial = jax.image.resize(spatial, (b, h, w, self.map_ch), 'bilinear')
    x = jnp.concatenate([appearance, spatial.astype(appearance.dtype)], axis=-1)
    x = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name='proj')(x)
    film = nn.Dense(2 * self.out_ch, kernel_init=nn.initializers.zeros, name='film')(m)
    gamma, beta = jnp.split(film.astype(x.dtype), 2, axis=-1)
    return x * (1 + gamma[:, None, None]) + beta[:, None, None]


class HeadAvatar(nn.Module):
  """Full backbone: (source, driver) -> (image (B, H, W, 3) float32 in [-1, 1], feats).

  feats holds G2D's ('input', 'block1'..'block9'), 'g2d_input', 'appearance', 'angles'
  (B, 3) degrees, 'expression' (B, expr_dim) and 'motion' = angles ++ expression (the
  bank keys and predictor input, Sec. 4.2). Methods for branches / bank building:
  `encode` (-> G2D input, motion dict), `motion_code`, `run_blocks`, `head`.
  """
  g2d_in: int = 1536
  ch: int = 512
  num_res: int = 6
  up_channels: Sequence[int] = (256, 128, 64)
  enc_ch: int = 64
  expr_dim: int = 512
  motion_ch: int = 32
  axis_name: str | None = None
  dtype: Dtype = jnp.float32
  remat: bool = False             # nn.remat G2D's ResBlock2Ds (train.remat)

  def setup(self):
    self.appearance_encoder = AppearanceEncoder(self.enc_ch, self.axis_name, self.dtype)
    self.motion_encoder = MotionEncoder(self.motion_ch, self.expr_dim,
                                        axis_name=self.axis_name, dtype=self.dtype)
    self.fusion = Fusion(self.g2d_in, map_ch=8 * self.motion_ch, dtype=self.dtype)
    self.g2d = G2D(self.g2d_in, self.ch, self.num_res, tuple(self.up_channels),
                   self.axis_name, self.dtype, self.remat)

  def motion_code(self, driver: Array, train: bool = False) -> dict[str, Array]:
    """Driver -> {'angles', 'expression', 'motion'} (motion = bank key, 3 + expr_dim)."""
    _check_image(driver, 'driver')
    angles, expression = self.motion_encoder(driver, train)
    return {'angles': angles, 'expression': expression,
            'motion': jnp.concatenate([angles, expression], axis=-1)}

  def encode(self, source: Array, driver: Array,
             train: bool = False) -> tuple[Array, dict[str, Array]]:
    """(source, driver) -> (G2D input (B, H/8, W/8, g2d_in), front-end feats)."""
    _check_image(source, 'source')
    if source.shape != driver.shape:
      raise ValueError(f'source {tuple(source.shape)} and driver {tuple(driver.shape)}: '
                       'expected the same shape')
    motion = self.motion_code(driver, train)
    appearance = self.appearance_encoder(source, train)
    x = self.fusion(appearance, motion['motion'])
    return x, dict(motion, appearance=appearance, g2d_input=x)

  def input_conv(self, x: Array) -> Array:
    return self.g2d.input_conv(x)

  def run_blocks(self, x: Array, start: int, stop: int, train: bool = False) -> Array:
    return self.g2d.run_blocks(x, start, stop, train)

  def head(self, x: Array) -> Array:
    return self.g2d.head(x)

  def __call__(self, source: Array, driver: Array,
               train: bool = False) -> tuple[Array, dict[str, Array]]:
    x, front = self.encode(source, driver, train)
    image, feats = self.g2d(x, train)
    return image, {**front, **feats}


def dtype_of(name: str) -> Dtype:
  """'float32' | 'bfloat16' -> jnp dtype (config.dtype)."""
  if name not in ('float32', 'bfloat16'):
    raise ValueError(f"dtype={name!r}: expected 'float32' or 'bfloat16'")
  return jnp.float32 if name == 'float32' else jnp.bfloat16


def from_config(config, axis_name: str | None = None) -> HeadAvatar:
  """HeadAvatar from a `base_megaportraits()` config (config.model, config.dtype)."""
  m = config.model
  return HeadAvatar(g2d_in=m.g2d_in, ch=m.ch, num_res=m.num_res,
                    up_channels=tuple(m.up_channels), enc_ch=m.enc_ch, expr_dim=m.expr_dim,
                    motion_ch=m.motion_ch, axis_name=axis_name,
                    dtype=dtype_of(config.dtype),
                    remat=bool(config.train.get('remat', False)))

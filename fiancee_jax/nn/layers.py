"""Shared layers: conv with spectral norm, sync batch norm, SPADE, SPADE-ResBlock, resizing.

Ports of the OASIS building blocks (boschresearch/OASIS, models/norms.py and
models/generator.py) with PyTorch's exact semantics so official checkpoints load and
reproduce (tests/test_oasis_torch.py). NHWC throughout.

Variable collections used by every module here:
  'params'       trainable weights (conv 'kernel' HWIO, 'bias').
  'batch_stats'  SyncBatchNorm running 'mean' / 'var' (torch running_mean / running_var).
  'spectral'     spectral-norm power-iteration state 'u' (out,) and 'v' (kh*kw*in,)
                 (torch weight_u / weight_v; v in HWIO-flattened order).
In train mode pass `mutable=['batch_stats', 'spectral']` (SN_COLLECTION) to `apply`.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax import lax

SN_COLLECTION = 'spectral'
STATS_COLLECTION = 'batch_stats'
MUTABLE = (STATS_COLLECTION, SN_COLLECTION)  # what a train-mode apply must make mutable

Dtype = Any


def xavier_normal(gain: float = 0.02) -> nn.initializers.Initializer:
  """torch.nn.init.xavier_normal_(gain): std = gain * sqrt(2 / (fan_in + fan_out))."""
  return nn.initializers.variance_scaling(gain ** 2, 'fan_avg', 'normal')


def torch_default_scale_sn_kernels(params: dict, collections: dict,
                                   gain: float = 0.02) -> dict:
  """Rescale every spectral-norm conv kernel (initialised `xavier_normal(gain)`) to PyTorch's
  default conv init size, std 1/sqrt(3 fan_in) (kaiming_uniform(a=sqrt(5))).

  Spectral norm divides the kernel by its largest singular value, so the forward pass is
  unchanged (u, v are unit vectors); only the optimiser sees a different parametrisation. With
  xavier(0.02) the kernels are ~lr-sized and Adam's first steps change them by ~100%, the one
  power iteration per step lags, and the gain compounds over ~25 SN layers: losses blow up at
  step 2-3 and Adam's second moment then freezes training (the PyTorch reference does the same).
  A kernel of the default size moves ~1% per step instead. Used by the backbone stage when
  config.train.sn_kernel_init = 'torch_default'.
  """
  out = flax.core.unfreeze(params)
  spectral = flax.traverse_util.flatten_dict(flax.core.unfreeze(collections.get(SN_COLLECTION, {})))
  flat = flax.traverse_util.flatten_dict(out)
  for path in spectral:
    if path[-1] != 'u':
      continue
    key = path[:-1] + ('kernel',)
    k = flat[key]
    kh, kw, cin, cout = k.shape
    fan_in, fan_out = kh * kw * cin, kh * kw * cout
    xavier_std = gain * (2.0 / (fan_in + fan_out)) ** 0.5
    flat[key] = k * ((3.0 * fan_in) ** -0.5 / xavier_std)
  return flax.traverse_util.unflatten_dict(flat)


def nearest_down(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Nearest resize of an NHWC map to `size` = (h, w) exactly as torch F.interpolate(nearest).

  Source index = floor(dst * in / out): for integer down-factors that is strided slicing
  x[:, ::s, ::s] (NOT jax.image.resize('nearest'), which samples pixel centres). The one
  resize helper for label maps / conditioning used module-wide.
  """
  h, w = int(size[0]), int(size[1])
  H, W = x.shape[1], x.shape[2]
  if (H, W) == (h, w):
    return x
  if H % h == 0 and W % w == 0:
    return x[:, ::H // h, ::W // w]
  iy = jnp.floor(jnp.arange(h) * (H / h)).astype(jnp.int32).clip(0, H - 1)
  ix = jnp.floor(jnp.arange(w) * (W / w)).astype(jnp.int32).clip(0, W - 1)
  return x[:, iy][:, :, ix]


def up2(x: jax.Array) -> jax.Array:
  """Nearest x2 upsampling (torch nn.Upsample(scale_factor=2)) of an NHWC map."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x: jax.Array) -> jax.Array:
  """2x2 average pooling, stride 2 (torch nn.AvgPool2d(2))."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _l2_normalize(x: jax.Array, eps: float) -> jax.Array:
  # torch F.normalize: x / max(||x||, eps)
  return x / jnp.maximum(jnp.linalg.norm(x), eps)


# Maps of at most this many pixels are convolved as im2col + matmul: XLA:CPU's convolution
# is 30-45x slower on them (`bench/xla_cpu_paths.py`, batch 30, 3x3 256->256: 2x4 maps 93 ms
# conv vs 2.1 ms; 4x8 maps 5.0 ms conv vs 9.7 ms im2col, so those keep the conv). Same sums,
# other order.
SMALL_MAP_PIXELS = 8


def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 conv of NHWC `x` with an HWIO kernel, zero padding k//2 (torch padding=k//2)."""
  k, p = kernel.shape[0], kernel.shape[0] // 2
  h, w = x.shape[1], x.shape[2]
  if k > 1 and h * w <= SMALL_MAP_PIXELS:
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    cols = jnp.stack([xp[:, i:i + h, j:j + w] for i in range(k) for j in range(k)], axis=3)
    return jnp.einsum('bhwtc,tcd->bhwd', cols, kernel.reshape(k * k, *kernel.shape[2:]))
  return lax.conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p)),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _xla_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
              padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_wgrad(x, kernel, strides, padding):
  return _xla_conv(x, kernel, strides, padding)


def _conv_matmul_wgrad_fwd(x, kernel, strides, padding):
  return _xla_conv(x, kernel, strides, padding), (x, kernel)


def _conv_matmul_wgrad_bwd(strides, padding, res, dy):
  x, kernel = res
  kh, kw, cin, cout = kernel.shape
  _, x_vjp = jax.vjp(lambda xx: _xla_conv(xx, kernel, strides, padding), x)
  cols = lax.conv_general_dilated_patches(x, (kh, kw), strides, padding,
                                          dimension_numbers=_NHWC)  # (B, h, w, cin*kh*kw)
  dk = jnp.einsum('bhwk,bhwo->ko', cols, dy.astype(cols.dtype))
  return x_vjp(dy)[0], dk.reshape(cin, kh, kw, cout).transpose(1, 2, 0, 3).astype(kernel.dtype)


_conv_matmul_wgrad.defvjp(_conv_matmul_wgrad_fwd, _conv_matmul_wgrad_bwd)


def conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
         padding: int = 0) -> jax.Array:
  """Conv of NHWC `x` with an HWIO kernel, symmetric zero padding `padding`.

  XLA:CPU computes the weight gradient of a stride-1 conv with an even kernel (the 4x4
  convs of the pix2pixHD patch discriminator) 5-90x slower than the same sums as an im2col
  matmul (`python bench/xla_cpu_paths.py`, batch 8, 256 -> 512 channels, AVX2: 501 vs 27 ms
  on 8x8 maps, 8.2 s vs 115 ms on 16x16; 3x3 kernels and stride 2 are not affected). There,
  on CPU, the weight gradient is that matmul; the forward pass and the input gradient stay
  XLA's conv."""
  strides = tuple(int(s) for s in strides)
  pad = ((padding, padding), (padding, padding))
  kh, kw = kernel.shape[:2]
  if strides == (1, 1) and (kh % 2 == 0 or kw % 2 == 0) and jax.default_backend() == 'cpu':
    return _conv_matmul_wgrad(x, kernel, strides, pad)
  return _xla_conv(x, kernel, strides, pad)


class Conv(nn.Module):
  """`nn.Conv` (same parameter names, shapes and init: HWIO 'kernel' lecun-normal, 'bias'
  zeros; symmetric integer padding) computed by `conv`."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
    bias = (self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv(x, kernel, (self.strides, self.strides), self.padding)
    return y if bias is None else y + bias


class SNConv(nn.Module):
  """2-D conv (stride 1, 'same' zero padding k//2, as torch padding=k//2) with optional
  spectral norm with torch.nn.utils.spectral_norm semantics (dim 0, eps 1e-12):
  train: one power-iteration step v = n(W^T u), u = n(W v) updating the 'spectral' state;
  eval: W / (u^T W v) with the stored u, v (no iteration). W is the kernel as (out, kh*kw*in).
  """
  features: int
  kernel_size: int = 3
  use_bias: bool = True
  spectral_norm: bool = True
  eps: float = 1e-12
  kernel_init: nn.initializers.Initializer = xavier_normal(0.02)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    k, cin = self.kernel_size, x.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (k, k, cin, self.features), jnp.float32)
    if self.spectral_norm:
      kernel = self._normalize(kernel, train)
    y = conv_same(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y

  def _normalize(self, kernel: jax.Array, train: bool) -> jax.Array:
    w = kernel.reshape(-1, self.features).T  # (out, kh*kw*in)

    def init_vec(n):
      return lambda: _l2_normalize(jax.random.normal(self.make_rng('params'), (n,)), self.eps)

    u_var = self.variable(SN_COLLECTION, 'u', init_vec(w.shape[0]))
    v_var = self.variable(SN_COLLECTION, 'v', init_vec(w.shape[1]))
    u, v = u_var.value, v_var.value
    if train:
      wd = lax.stop_gradient(w)
      v = _l2_normalize(wd.T @ u, self.eps)
      u = _l2_normalize(wd @ v, self.eps)
      if not self.is_initializing():
        u_var.value, v_var.value = u, v
    sigma = jnp.dot(u, w @ v)
    return kernel / sigma


class SyncBatchNorm(nn.Module):
  """Batch norm over (N, H, W) with statistics averaged over `axis_name` (OASIS's
  SynchronizedBatchNorm2d). Train: normalize with the biased batch variance, update running
  stats with momentum 0.1 and the unbiased variance (torch); eval: running stats."""
  affine: bool = False
  momentum: float = 0.1
  eps: float = 1e-5
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    ra_mean = self.variable(STATS_COLLECTION, 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable(STATS_COLLECTION, 'var', lambda: jnp.ones((c,), jnp.float32))
    xf = x.astype(jnp.float32)
    if train:
      n = x.shape[0] * x.shape[1] * x.shape[2]
      mean = xf.mean(axis=(0, 1, 2))
      if self.axis_name is not None:
        mean = lax.pmean(mean, self.axis_name)
        n = n * lax.psum(1, self.axis_name)
      var = jnp.square(xf - mean).mean(axis=(0, 1, 2))
      if self.axis_name is not None:
        var = lax.pmean(var, self.axis_name)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * mean
        ra_var.value = (1 - m) * ra_var.value + m * var * n / jnp.maximum(n - 1, 1)
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * lax.rsqrt(var + self.eps)
    if self.affine:
      y = y * self.param('scale', nn.initializers.ones_init(), (c,), jnp.float32)
      y = y + self.param('bias', nn.initializers.zeros_init(), (c,), jnp.float32)
    return y.astype(x.dtype)


class SPADE(nn.Module):
  """SPADE (OASIS norms.SPADE): param-free sync BN of x, modulated by gamma/beta predicted
  from the conditioning map `seg` (any resolution >= x's; nearest-resized to x's size):
  out = norm(x) * (1 + gamma) + beta, with conv3x3(seg)->ReLU shared, conv3x3 for each."""
  features: int
  hidden: int = 128
  kernel_size: int = 3
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, seg: jax.Array, train: bool = False) -> jax.Array:
    normalized = SyncBatchNorm(axis_name=self.axis_name, name='first_norm')(x, train)
    seg = nearest_down(seg, x.shape[1:3])
    conv = lambda f, name: SNConv(f, self.kernel_size, spectral_norm=False, dtype=self.dtype,
                                  name=name)
    actv = nn.relu(conv(self.hidden, 'mlp_shared')(seg))
    gamma = conv(self.features, 'mlp_gamma')(actv)
    beta = conv(self.features, 'mlp_beta')(actv)
    return (normalized * (1 + gamma) + beta).astype(self.dtype)


class SPADEResBlock(nn.Module):
  """OASIS ResnetBlock_with_SPADE: fmiddle = min(fin, fout);
  dx = conv_1(lrelu(SPADE_1(conv_0(lrelu(SPADE_0(x)))))), shortcut = conv_s(SPADE_s(x))
  (1x1, no bias) only when fin != fout, else x. Block convs carry spectral norm."""
  fin: int
  fout: int
  hidden: int = 128
  spectral_norm: bool = True
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, seg: jax.Array, train: bool = False) -> jax.Array:
    if x.shape[-1] != self.fin:
      raise ValueError(f'SPADEResBlock: input has {x.shape[-1]} channels, expected fin={self.fin}')
    fmiddle = min(self.fin, self.fout)
    spade = lambda f, name: SPADE(f, self.hidden, axis_name=self.axis_name, dtype=self.dtype,
                                  name=name)
    conv = lambda f, k, bias, name: SNConv(f, k, use_bias=bias, spectral_norm=self.spectral_norm,
                                           dtype=self.dtype, name=name)
    if self.fin != self.fout:
      x_s = conv(self.fout, 1, False, 'conv_s')(spade(self.fin, 'norm_s')(x, seg, train), train)
    else:
      x_s = x
    dx = conv(fmiddle, 3, True, 'conv_0')(
        nn.leaky_relu(spade(self.fin, 'norm_0')(x, seg, train), 0.2), train)
    dx = conv(self.fout, 3, True, 'conv_1')(
        nn.leaky_relu(spade(fmiddle, 'norm_1')(dx, seg, train), 0.2), train)
    return x_s + dx


def sn_power_iterate(params: dict, collections: dict, iters: int = 50, eps: float = 1e-12,
                     only: Any = None) -> dict:
  """`collections` with spectral-norm (u, v) pairs set by `iters` power iterations on their
  kernels in `params`, starting from the stored u (same layout as
  `torch_default_scale_sn_kernels`): after kernels are replaced wholesale (a branch sliced
  from the backbone), W / (u^T W v) is their spectral normalisation again instead of one from
  vectors of other kernels. `only`: the module paths (tuples, without the collection name)
  to redo; default all."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  spectral = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(collections.get(SN_COLLECTION, {})))
  out = dict(spectral)
  for path in spectral:
    if path[-1] != 'u' or (only is not None and path[:-1] not in only):
      continue
    k = np.asarray(flat[path[:-1] + ('kernel',)], np.float64)
    w = k.reshape(-1, k.shape[-1]).T                    # (out, kh*kw*in), as SNConv
    u = np.asarray(spectral[path], np.float64)
    u = u / max(np.linalg.norm(u), eps)
    for _ in range(iters):
      v = w.T @ u
      v = v / max(np.linalg.norm(v), eps)
      u = w @ v
      u = u / max(np.linalg.norm(u), eps)
    dt = np.asarray(spectral[path]).dtype
    out[path], out[path[:-1] + ('v',)] = u.astype(dt), v.astype(dt)
  return {**collections, SN_COLLECTION: flax.traverse_util.unflatten_dict(out)}

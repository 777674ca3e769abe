"""SSIM / MS-SSIM (head-avatar loss), differentiable, matching `pytorch_msssim`.

Gaussian window (11, sigma 1.5) applied separably with 'valid' borders, K=(0.01, 0.03),
5 scales weighted (0.0448, 0.2856, 0.3001, 0.2363, 0.1333); between scales a 2x2
average pool padded by (size % 2) with zeros counted, as `F.avg_pool2d` does.
Images NHWC; `data_range` is max - min of the pixel range (2.0 for [-1, 1]).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

MS_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gauss(size: int, sigma: float) -> jnp.ndarray:
  c = jnp.arange(size, dtype=jnp.float32) - size // 2
  g = jnp.exp(-(c ** 2) / (2 * sigma ** 2))
  return g / g.sum()


def _blur(x: jnp.ndarray, win: jnp.ndarray) -> jnp.ndarray:
  """Depthwise separable 'valid' Gaussian blur along H then W (NHWC)."""
  c, n = x.shape[-1], win.shape[0]
  for axis in (1, 2):
    if x.shape[axis] < n:
      continue  # pytorch_msssim skips (with a warning) dims smaller than the window
    shape = (n, 1, 1, c) if axis == 1 else (1, n, 1, c)
    k = jnp.broadcast_to(win.reshape(shape[:2] + (1, 1)), shape).astype(x.dtype)
    x = jax.lax.conv_general_dilated(x, k, (1, 1), 'VALID', feature_group_count=c,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return x


def _ssim_cs(x: jnp.ndarray, y: jnp.ndarray, data_range: float, win: jnp.ndarray,
             k: Sequence[float]) -> tuple[jnp.ndarray, jnp.ndarray]:
  c1, c2 = (k[0] * data_range) ** 2, (k[1] * data_range) ** 2
  mu1, mu2 = _blur(x, win), _blur(y, win)
  s11 = _blur(x * x, win) - mu1 ** 2
  s22 = _blur(y * y, win) - mu2 ** 2
  s12 = _blur(x * y, win) - mu1 * mu2
  cs_map = (2 * s12 + c2) / (s11 + s22 + c2)
  ssim_map = (2 * mu1 * mu2 + c1) / (mu1 ** 2 + mu2 ** 2 + c1) * cs_map
  return ssim_map.mean(axis=(1, 2)), cs_map.mean(axis=(1, 2))  # (B, C)


def _check(x: jnp.ndarray, y: jnp.ndarray, win_size: int) -> None:
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(f'SSIM expects two NHWC batches of equal shape; got {x.shape}, {y.shape}')
  if win_size % 2 != 1:
    raise ValueError(f'SSIM win_size must be odd; got {win_size}')


def ssim(x: jnp.ndarray, y: jnp.ndarray, data_range: float = 2.0, win_size: int = 11,
         win_sigma: float = 1.5, k: Sequence[float] = (0.01, 0.03)) -> jnp.ndarray:
  """Per-image SSIM (B,) averaged over channels."""
  _check(x, y, win_size)
  return _ssim_cs(x, y, data_range, _gauss(win_size, win_sigma), k)[0].mean(-1)


def ms_ssim(x: jnp.ndarray, y: jnp.ndarray, data_range: float = 2.0, win_size: int = 11,
            win_sigma: float = 1.5, weights: Sequence[float] = MS_WEIGHTS,
            k: Sequence[float] = (0.01, 0.03)) -> jnp.ndarray:
  """Per-image MS-SSIM (B,). Needs min(H, W) > (win_size - 1) * 2**(len(weights) - 1)."""
  _check(x, y, win_size)
  levels = len(weights)
  need = (win_size - 1) * 2 ** (levels - 1)
  if min(x.shape[1:3]) <= need:
    raise ValueError(f'MS-SSIM with {levels} scales and window {win_size} needs images larger '
                     f'than {need} px; got {x.shape[1]}x{x.shape[2]} (pass fewer `weights`)')
  win = _gauss(win_size, win_sigma)
  mcs = []
  for i in range(levels):
    s, cs = _ssim_cs(x, y, data_range, win, k)
    if i < levels - 1:
      mcs.append(jax.nn.relu(cs))
      pad = [(0, 0), (x.shape[1] % 2,) * 2, (x.shape[2] % 2,) * 2, (0, 0)]
      pool = lambda z, p=pad: jax.lax.reduce_window(  # noqa: E731
          jnp.pad(z, p), 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID') / 4
      x, y = pool(x), pool(y)
  stack = jnp.stack(mcs + [jax.nn.relu(s)], axis=0)  # (levels, B, C)
  w = jnp.asarray(weights, stack.dtype).reshape(-1, 1, 1)
  return jnp.prod(stack ** w, axis=0).mean(-1)

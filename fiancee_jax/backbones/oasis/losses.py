"""OASIS losses: class-balanced (N+1)-way cross-entropy and LabelMix (Sushko et al. 2021).

The OASIS discriminator is a per-pixel (N+1)-way classifier: channel 0 means 'fake',
channel c+1 means 'real pixel of semantic class c'. Real pixels are weighted by inverse
class frequency so rare classes (poles, signs) count as much as road and sky.

Written for a per-device train step: with `axis_name` the class counts are summed over all
devices, so the weights are those of the global batch and data-parallel training equals
single-device training on the same global batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax


def class_balancing_weights(labels: jax.Array, num_classes: int, *,
                            dontcare_class: int | None = 0,
                            axis_name: str | None = None) -> jax.Array:
  """Per-pixel weights (B, H, W) = (B*H*W) / (count_c * classes_present) for the pixel's
  class c, counted over the (global) batch; the 'unlabeled' class gets weight 0 and is not
  counted as present (OASIS `get_class_balancing` with contain_dontcare_label).

  labels: (B, H, W) integer class ids in [0, num_classes).
  """
  counts = jnp.zeros((num_classes,), jnp.float32).at[labels.reshape(-1)].add(1.0)
  total = jnp.asarray(labels.size, jnp.float32)
  if axis_name is not None:
    counts = lax.psum(counts, axis_name)
    total = lax.psum(total, axis_name)
  if dontcare_class is not None:
    counts = counts.at[dontcare_class].set(0.0)
  present = jnp.sum(counts > 0)
  coef = jnp.where(counts > 0, total / (jnp.maximum(counts, 1.0) * jnp.maximum(present, 1)), 0.0)
  return coef[labels]


def n1_cross_entropy(logits: jax.Array, labels: jax.Array, *, for_real: bool,
                     weights: jax.Array | None = None) -> jax.Array:
  """OASIS (N+1)-way cross-entropy, a scalar.

  logits: (B, H, W, N+1) discriminator output, channel 0 = fake.
  labels: (B, H, W) class ids. for_real: target = label + 1, mean of CE x `weights`
  (class balancing); else target 0 ('fake') everywhere, unweighted mean (OASIS `loss`).
  The generator's adversarial loss is this with for_real=True on D(fake).
  """
  logits = logits.astype(jnp.float32)
  if not for_real:
    # Target 0 everywhere, written without a gather: a constant-index gather's gradient is
    # a scatter that XLA tries to constant-fold (seconds of compile time per call).
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32) + 1)
  if weights is not None:
    ce = ce * weights
  return jnp.mean(ce)


def labelmix_mask(key: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """LabelMix mask (B, H, W, 1) in {0, 1}: one random bit per semantic class, shared by the
  whole batch (OASIS `generate_labelmix`). The same key on every device gives the same bits,
  so the mask of the global batch does not depend on how it is split."""
  bits = jax.random.bernoulli(key, 0.5, (num_classes,)).astype(jnp.float32)
  return bits[labels][..., None]


def labelmix_images(mask: jax.Array, real: jax.Array, fake: jax.Array) -> jax.Array:
  """mask * real + (1 - mask) * fake (the discriminator's LabelMix input)."""
  return mask * real + (1.0 - mask) * fake


def labelmix_loss(mask: jax.Array, d_mixed: jax.Array, d_fake: jax.Array,
                  d_real: jax.Array) -> jax.Array:
  """LabelMix consistency: MSE between D(mixed) logits and the same mix of D(real), D(fake)
  logits (OASIS `loss_labelmix`; the caller scales it by labelmix_lambda)."""
  target = mask * d_real + (1.0 - mask) * d_fake
  return jnp.mean(jnp.square(d_mixed.astype(jnp.float32) - target.astype(jnp.float32)))

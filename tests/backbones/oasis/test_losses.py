"""OASIS losses on hand-made inputs (values computed by hand in the comments)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax.backbones.oasis import losses


def test_class_weights_2x2_by_hand():
  # labels [[0, 1], [1, 2]], 3 classes: class 0 is 'unlabeled' -> weight 0, not present.
  # counts c1 = 2, c2 = 1; present = 2; B*H*W = 4 -> w1 = 4/(2*2) = 1, w2 = 4/(1*2) = 2.
  labels = jnp.array([[[0, 1], [1, 2]]])
  w = losses.class_balancing_weights(labels, 3)
  np.testing.assert_allclose(np.asarray(w), [[[0.0, 1.0], [1.0, 2.0]]])
  # Without the don't-care class: counts 1, 2, 1; present 3 -> 4/3, 2/3, 4/3.
  w = losses.class_balancing_weights(labels, 3, dontcare_class=None)
  np.testing.assert_allclose(np.asarray(w), [[[4 / 3, 2 / 3], [2 / 3, 4 / 3]]], rtol=1e-6)


def test_class_weights_psum_equals_global_batch():
  # Over a 2-device axis the weights are those of the concatenated batch.
  labels = jnp.array([[[1, 1], [1, 2]], [[2, 2], [3, 0]]])
  full = losses.class_balancing_weights(labels, 4)
  split = jax.vmap(lambda l: losses.class_balancing_weights(l[None], 4, axis_name='d'),
                   axis_name='d')(labels)
  np.testing.assert_allclose(np.asarray(split[:, 0]), np.asarray(full), rtol=1e-6)


def test_n1_targets_real_is_label_plus_one_fake_is_zero():
  labels = jnp.array([[[0, 2]]])            # (1, 1, 2)
  big = 30.0
  # logits peaked at channel label+1: real CE ~ 0; fake CE (target 0) ~ big.
  logits = jax.nn.one_hot(labels + 1, 4) * big
  assert float(losses.n1_cross_entropy(logits, labels, for_real=True)) < 1e-6
  np.testing.assert_allclose(float(losses.n1_cross_entropy(logits, labels, for_real=False)),
                             big + np.log1p(3 * np.exp(-big)), rtol=1e-5)
  # Uniform logits: CE = log(4) for any target; weights scale the real term only.
  flat = jnp.zeros((1, 1, 2, 4))
  w = jnp.array([[[0.0, 2.0]]])
  np.testing.assert_allclose(float(losses.n1_cross_entropy(flat, labels, for_real=True,
                                                           weights=w)), np.log(4), rtol=1e-6)
  np.testing.assert_allclose(float(losses.n1_cross_entropy(flat, labels, for_real=False,
                                                           weights=w)), np.log(4), rtol=1e-6)


def test_labelmix():
  key = jax.random.PRNGKey(0)
  labels = jnp.array(np.random.default_rng(0).integers(0, 5, (2, 4, 4)))
  mask = losses.labelmix_mask(key, labels, 5)
  assert mask.shape == (2, 4, 4, 1)
  # One bit per class over the whole batch: pixels of a class share the bit.
  m = np.asarray(mask[..., 0])
  for c in range(5):
    assert len(set(m[np.asarray(labels) == c].tolist())) <= 1
  real, fake = jnp.ones((2, 4, 4, 3)), -jnp.ones((2, 4, 4, 3))
  mixed = losses.labelmix_images(mask, real, fake)
  np.testing.assert_array_equal(np.asarray(mixed[..., 0]), 2 * m - 1)
  d_real = jax.random.normal(key, (2, 4, 4, 6))
  d_fake = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 6))
  ones = jnp.ones_like(mask)
  # Mask all ones: mixed == real, so D(mixed) == D(real) gives zero loss.
  assert float(losses.labelmix_loss(ones, d_real, d_fake, d_real)) == 0.0
  # Otherwise the MSE to the mixed target: all zeros mask -> MSE(d_mixed, d_fake).
  np.testing.assert_allclose(float(losses.labelmix_loss(0 * ones, d_real, d_fake, d_real)),
                             float(jnp.mean((d_real - d_fake) ** 2)), rtol=1e-6)

"""fiancee_jax/nn/layers.py: `conv` / `Conv` (the matmul weight gradient of stride-1
even-kernel convs) against XLA's conv and flax's nn.Conv."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax.nn import layers


@pytest.mark.parametrize('k, stride, pad', [(4, 1, 2), (4, 2, 2), (3, 1, 1), (2, 1, 0)])
def test_conv_value_and_grads_equal_xla_conv(k, stride, pad):
  rng = np.random.default_rng(k + stride)
  x = jnp.asarray(rng.standard_normal((2, 7, 9, 5)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, 5, 6)) * 0.1, jnp.float32)
  dy = jnp.asarray(rng.standard_normal(layers._xla_conv(   # noqa: SLF001
      x, w, (stride, stride), ((pad, pad), (pad, pad))).shape), jnp.float32)

  def loss(f):
    return lambda x, w: jnp.sum(f(x, w) * dy)

  ours = loss(lambda x, w: layers.conv(x, w, (stride, stride), pad))
  ref = loss(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (stride, stride), ((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5)
  for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_conv_module_is_nn_conv():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
  ours, ref = layers.Conv(4, (4, 4), strides=1, padding=2), nn.Conv(4, (4, 4), strides=1,
                                                                      padding=2)
  v_ours, v_ref = ours.init(jax.random.key(0), x), ref.init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, v_ours, v_ref)   # same names, shapes, init
  np.testing.assert_allclose(ours.apply(v_ours, x), ref.apply(v_ref, x), rtol=1e-5, atol=1e-6)

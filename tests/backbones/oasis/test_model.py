"""OASIS generator / discriminator / shared layers on tiny shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax.backbones.oasis import discriminator as discriminators

from fiancee_jax.backbones.oasis import model as oasis

from fiancee_jax.nn import layers

NC, H, W = 35, 64, 64


@pytest.fixture(scope='module')
def gen():
  g = oasis.Generator(num_classes=NC, height=H, width=W, ch=4, z_dim=8, spade_hidden=8)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, NC, (2, H, W)))
  z = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8)), jnp.float32)
  # 'rbg' keys: the init graph compiles ~2.5x faster than with threefry on CPU.
  v = jax.jit(lambda k, s, z: g.init(k, s, z, False))(jax.random.key(0, impl='rbg'), ids, z)
  return g, v, ids, z


def test_generator_shapes_and_feats(gen):
  g, v, ids, z = gen
  assert set(v) == {'params', 'batch_stats', 'spectral'}
  img, feats = jax.jit(lambda v, s, z: g.apply(v, s, z, False))(v, ids, z)
  assert img.shape == (2, H, W, 3) and img.dtype == jnp.float32
  assert float(jnp.abs(img).max()) <= 1.0
  w = oasis.widths(4)
  assert w == (64, 64, 64, 32, 16, 8, 4)
  assert feats['fc'].shape == (2, 2, 2, w[0])  # H/32 x W/32
  for k in range(1, 7):  # block k's output before its upsampling: 2 * 2^(k-1)
    s = 2 * 2 ** (k - 1)
    assert feats[f'block{k}'].shape == (2, s, s, w[k]), k
  # A prefix computed once, continued with run_blocks, reproduces the full forward.
  cond = g.apply(v, ids, z, method=oasis.Generator.make_cond)
  assert cond.shape == (2, H, W, 8 + NC)
  np.testing.assert_array_equal(cond[..., :8], jnp.broadcast_to(z[:, None, None], (2, H, W, 8)))

  def tail(v, x, cond):
    x, f = g.apply(v, x, cond, 2, 6, False, method=oasis.Generator.run_blocks)
    return g.apply(v, x, method=oasis.Generator.head), f
  img2, f2 = jax.jit(tail)(v, feats['block2'], cond)
  assert set(f2) == {'block3', 'block4', 'block5', 'block6'}
  np.testing.assert_allclose(img2, img, atol=1e-6)


def test_noise_sampled_inside_when_z_is_none(gen):
  g, v, ids, _ = gen
  f = jax.jit(lambda v, s, k: g.apply(v, s, None, rngs={'noise': k},
                                      method=oasis.Generator.make_cond))
  a, b = f(v, ids, jax.random.key(1)), f(v, ids, jax.random.key(2))
  assert not np.allclose(a[..., :8], b[..., :8])
  np.testing.assert_array_equal(a, f(v, ids, jax.random.key(1)))


def test_bad_label_maps_raise_one_clear_error():
  with pytest.raises(ValueError, match=r'values must be in \[0, 35\)'):
    oasis.validate_inputs(np.full((1, H, W), 35), NC, H, W)
  with pytest.raises(ValueError, match='spatial size 32x64 does not match.*64x64'):
    oasis.validate_inputs(np.zeros((1, 32, 64), np.int32), NC, H, W)
  with pytest.raises(ValueError, match='one-hot shape'):
    oasis.validate_inputs(np.zeros((1, H, W, 34), np.float32), NC, H, W)
  out = oasis.validate_inputs(np.array([[[3]]]), 5, 1, 1)
  np.testing.assert_array_equal(out, [[[[0, 0, 0, 1, 0]]]])
  with pytest.raises(ValueError, match='multiples of 32'):
    oasis.Generator(num_classes=NC, height=48, width=64).init(
        jax.random.key(0), np.zeros((1, 48, 64), np.int32), np.zeros((1, 64)))


def test_nearest_down_matches_torch_nearest():
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(0).normal(size=(1, 12, 10, 2)).astype(np.float32)
  for size in [(4, 5), (5, 4), (3, 7), (12, 10)]:
    want = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=size)
    np.testing.assert_array_equal(layers.nearest_down(jnp.asarray(x), size),
                                  want.numpy().transpose(0, 2, 3, 1))
  # jax.image.resize('nearest') samples pixel centres: a different map (why we don't use it).
  assert not np.array_equal(layers.nearest_down(jnp.asarray(x), (4, 5)),
                            jax.image.resize(x, (1, 4, 5, 2), 'nearest'))
  np.testing.assert_array_equal(layers.up2(jnp.asarray(x))[:, ::2, ::2], x)


def test_sync_batchnorm_over_devices_equals_global_batch():
  assert jax.device_count() >= 4
  bn = layers.SyncBatchNorm(axis_name='data')
  x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, size=(8, 3, 3, 5)), jnp.float32)
  v = layers.SyncBatchNorm().init(jax.random.key(0), x, False)
  mesh = jax.make_mesh((4,), ('data',))
  P = jax.sharding.PartitionSpec

  def step(v, x):
    return bn.apply(v, x, True, mutable=['batch_stats'])
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P('data')))
  y, upd = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P('data')),
                                 out_specs=(P('data'), P())))(v, xs)
  y_ref, upd_ref = layers.SyncBatchNorm().apply(v, x, True, mutable=['batch_stats'])
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  xn = np.asarray(x).reshape(-1, 5)
  np.testing.assert_allclose(upd['batch_stats']['mean'], 0.1 * xn.mean(0), rtol=1e-5)
  np.testing.assert_allclose(upd['batch_stats']['var'], 0.9 + 0.1 * xn.var(0, ddof=1), rtol=1e-5)
  np.testing.assert_allclose(upd_ref['batch_stats']['var'], upd['batch_stats']['var'], rtol=1e-5)


def test_spectral_norm_train_and_eval():
  conv = layers.SNConv(6, 3)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 5, 4)), jnp.float32)
  v = conv.init(jax.random.key(0), x, False)
  step = jax.jit(lambda v: {**v, **conv.apply(v, x, True, mutable=['spectral'])[1]})
  for _ in range(30):  # power iteration converges to the top singular value
    v = step(v)
  w = np.asarray(v['params']['kernel']).reshape(-1, 6)
  sigma = np.linalg.svd(w, compute_uv=False)[0]
  y = conv.apply(v, x, False)
  plain = layers.SNConv(6, 3, spectral_norm=False).apply({'params': v['params']}, x)
  np.testing.assert_allclose(y, plain / sigma, rtol=1e-3, atol=1e-6)


def test_discriminator_shapes():
  d = discriminators.OASISDiscriminator(NC, (3, 8, 8, 8, 16, 16, 16))
  img = jnp.zeros((1, H, W, 3))
  # Shapes only (eval_shape: nothing compiles; the layers run in the generator tests).
  v = jax.eval_shape(lambda x: d.init(jax.random.key(0), x, False), img)
  assert set(v) == {'params', 'spectral'}
  assert 'layer_up_last' in v['params'] and 'layer_up_last' not in v['spectral']  # no SN
  assert v['spectral']['body_up_5']['conv_s']['u'].shape == (64,)
  (logits, feats), _ = jax.eval_shape(lambda v, x: d.apply(v, x, True, mutable=['spectral']),
                                      v, img)
  assert logits.shape == (1, H, W, NC + 1)
  assert feats['down6'].shape == (1, 1, 1, 16) and feats['up6'].shape == (1, H, W, 64)
  with pytest.raises(ValueError, match='multiples of 64'):
    d.init(jax.random.key(0), jnp.zeros((1, 48, 64, 3)), False)


def test_conv_same_small_maps_equal_the_convolution():
  """Maps of <= SMALL_MAP_PIXELS pixels go through im2col + matmul (XLA:CPU's conv is ~30x
  slower there): the same function as the convolution, for 3x3 and 1x1 kernels."""
  from jax import lax
  from fiancee_jax.nn import layers
  rng = np.random.default_rng(0)
  for (h, w), k in (((2, 4), 3), ((1, 1), 3), ((2, 2), 1), ((4, 8), 3)):
    x = rng.standard_normal((3, h, w, 5)).astype(np.float32)
    kern = rng.standard_normal((k, k, 5, 7)).astype(np.float32)
    want = lax.conv_general_dilated(x, kern, (1, 1), ((k // 2, k // 2),) * 2,
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    np.testing.assert_allclose(layers.conv_same(x, kern), want, rtol=1e-5, atol=1e-5)

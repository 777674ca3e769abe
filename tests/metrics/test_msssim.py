"""MS-SSIM / SSIM parity with pytorch_msssim."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax.metrics import msssim

torch = pytest.importorskip('torch', reason='torch (test dependency) is needed for MS-SSIM parity')
pm = pytest.importorskip('pytorch_msssim', reason='pytorch-msssim (test dependency) is needed')


def _pair(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, shape).astype(np.float32)
  x = (x + np.roll(x, 1, 1) + np.roll(x, 1, 2)) / 3  # some spatial correlation
  y = np.clip(x + rng.normal(0, 0.2, shape), -1, 1).astype(np.float32)
  return x, y


def _t(a):
  return torch.from_numpy(a.transpose(0, 3, 1, 2).copy())


def test_ms_ssim_parity():
  x, y = _pair((2, 177, 162, 3))  # odd and even sizes exercise the pooling pad; 5 scales need > 160
  ours = np.asarray(msssim.ms_ssim(jnp.asarray(x), jnp.asarray(y), data_range=2.0))
  ref = pm.ms_ssim(_t(x), _t(y), data_range=2.0, size_average=False).numpy()
  assert 0.1 < ref.min() < 0.99
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_ssim_parity_and_grad():
  x, y = _pair((2, 32, 40, 3), seed=1)
  ours = np.asarray(msssim.ssim(jnp.asarray(x), jnp.asarray(y)))
  ref = pm.ssim(_t(x), _t(y), data_range=2.0, size_average=False).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  g = jax.grad(lambda a: msssim.ssim(a, jnp.asarray(y)).sum())(jnp.asarray(x))
  assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).sum()) > 0
  assert float(msssim.ssim(jnp.asarray(x), jnp.asarray(x))[0]) == pytest.approx(1.0, abs=1e-5)


def test_ms_ssim_errors():
  x = jnp.zeros((1, 64, 64, 3))
  with pytest.raises(ValueError, match='larger than 160'):
    msssim.ms_ssim(x, x)
  with pytest.raises(ValueError, match='equal shape'):
    msssim.ms_ssim(x, x[:, :32])

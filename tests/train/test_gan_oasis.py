"""Backbone stage (train/gan.py + backbones/oasis/gan.py) end to end on the tiny OASIS config:
train, samples/TensorBoard/checkpoints, exact resume after SIGTERM (4 steps == 2 + kill +
resume 2), EMA generator for later stages."""
import glob
import os
import signal

import jax
import numpy as np
import pytest

from fiancee_jax import workdir as wdir
from fiancee_jax import config as cfg
from fiancee_jax import registry
from fiancee_jax.train import checkpoint, gan

CONFIGS = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')


def _config(num_steps, data_dir):
  c = cfg.load(os.path.join(CONFIGS, 'oasis_synthetic.py'), 'tiny')
  c.train.num_steps = num_steps
  c.data.data_dir = str(data_dir)
  return c


@pytest.fixture(scope='module')
def comp(tmp_path_factory):
  """The compiled step, init, sampler and refresh of the tiny config, shared by the module's
  runs (its key ignores num_steps, data_dir and sn_kernel_init)."""
  return gan.compiled(registry.get(_config(4, tmp_path_factory.mktemp('unused'))))


def _train(config, workdir, comp, **kw):
  return gan.train_and_evaluate(registry.get(config), workdir, comp=comp, **kw)


def _sigterm_after(n):
  def hook(step, state, metrics):  # noqa: ARG001
    if step == n:
      os.kill(os.getpid(), signal.SIGTERM)   # the real signal path: finish step, save, return
  return hook


def test_resume_after_sigterm_is_exact(tmp_path, comp):
  data = tmp_path / 'data'
  straight = _train(_config(4, data), str(tmp_path / 'a'), comp)
  assert int(straight.step) == 4

  wd = str(tmp_path / 'b')
  stopped = _train(_config(4, data), wd, comp, hooks=[_sigterm_after(2)])
  assert int(stopped.step) == 2
  ckdir = wdir.checkpoint_dir(wd, 'backbone')
  assert sorted(os.listdir(ckdir)) == ['2']
  resumed = _train(_config(4, data), wd, comp)
  assert int(resumed.step) == 4
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(straight),
                          jax.tree.leaves(resumed)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))

  # Outputs a user looks at: samples (PNG + TensorBoard events), checkpoints 2 and 4.
  assert sorted(os.listdir(ckdir)) == ['2', '4']
  pngs = sorted(glob.glob(os.path.join(wd, 'samples', '*.png')))
  assert [os.path.basename(p) for p in pngs] == ['step_0000002.png', 'step_0000004.png']
  assert glob.glob(os.path.join(wd, 'tensorboard', 'events.out.tfevents.*'))

  # The one loader later stages use: EMA generator params + refreshed collections.
  params, coll, meta = checkpoint.load_backbone(wd, _config(4, data))
  assert meta['step'] == 4
  jax.tree.map(np.testing.assert_array_equal, params, resumed.ema_params_g)
  assert set(coll) == {'batch_stats', 'spectral'}
  refreshed = coll['batch_stats']['body_0']['norm_0']['first_norm']['mean']
  ema = resumed.ema_state_g['batch_stats']['body_0']['norm_0']['first_norm']['mean']
  assert np.all(np.isfinite(refreshed)) and not np.allclose(refreshed, ema)


def test_other_config_in_workdir_is_refused(tmp_path, comp):
  c = _config(0, tmp_path / 'data')  # 0 steps: writes the initial checkpoint only
  _train(c, str(tmp_path / 'w'), comp)
  other = _config(0, tmp_path / 'data')
  other.model.spade_hidden = 16
  with pytest.raises(checkpoint.CheckpointError, match='was written for config hash'):
    gan.train_and_evaluate(registry.get(other), str(tmp_path / 'w'))
  # Code compiled for one architecture is not run for another.
  with pytest.raises(gan.GANStageError, match='another model / optimiser config'):
    _train(other, str(tmp_path / 'w2'), comp)


def test_unknown_sn_kernel_init_is_a_clear_error(tmp_path):
  c = _config(1, tmp_path / 'data')
  c.train.sn_kernel_init = 'he'
  with pytest.raises(ValueError, match="train.sn_kernel_init='he'"):
    cfg.validate(c)


def test_torch_default_sn_scale_keeps_the_forward_pass(tmp_path, comp):
  """Rescaling the SN kernels changes the parametrisation, not the function: same eval output,
  kernels at std ~ 1/sqrt(3 fan_in) instead of xavier(0.02)."""
  c = _config(0, tmp_path / 'data')
  bb = registry.get(c)
  c.train.sn_kernel_init = 'xavier'
  x = gan.create_train_state(bb, comp)
  c.train.sn_kernel_init = 'torch_default'
  t = gan.create_train_state(bb, comp)
  kx = x.params_g['body_1']['conv_0']['kernel']
  kt = t.params_g['body_1']['conv_0']['kernel']
  fan_in = np.prod(kx.shape[:3])
  assert abs(np.std(kt) * np.sqrt(3 * fan_in) - 1) < 0.15 and np.std(kx) < np.std(kt) / 5
  np.testing.assert_array_equal(x.params_g['fc']['kernel'], t.params_g['fc']['kernel'])  # no SN
  labels = np.random.default_rng(0).integers(0, 30, (2, c.data.height, c.data.width))
  z = np.random.default_rng(1).normal(size=(2, c.model.z_dim)).astype(np.float32)
  inputs = {'label': labels.astype(np.int32), 'z': z}
  run = lambda s: comp.sample(s.params_g, s.state_g, inputs)  # noqa: E731 (eval-mode G)
  np.testing.assert_allclose(run(x), run(t), atol=1e-5)


def test_torch_default_sn_scale_makes_first_updates_small(tmp_path, comp):
  """The mechanism behind the step 2-3 blow-up of xavier(0.02) SN kernels on synthetic_streets
  (losses ~1e4-1e5, then Adam's second moment freezes G): Adam moves every weight by ~lr at
  first, which is a large share of a kernel that small. With 'torch_default' the first update
  is a small relative change, and the losses of the step stay finite."""
  c = _config(1, tmp_path / 'data')
  bb = registry.get(c)
  dp = comp.step
  rng = np.random.default_rng(0)
  h, w = c.data.height, c.data.width
  batch = dp.put_batch({'image': rng.integers(0, 256, (4, h, w, 3)).astype(np.uint8),
                        'label': rng.integers(0, 8, (4, h, w)).astype(np.uint8)})
  rel = {}
  for init in ('xavier', 'torch_default'):
    c.train.sn_kernel_init = init
    s0 = gan.create_train_state(bb, comp)
    s1, metrics = dp(dp.put_state(gan.step_state(bb.gan_task(), s0)), batch)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    k0 = s0.params_g['body_2']['conv_1']['kernel']
    k1 = np.asarray(dp.get_state(s1.train).params_g['body_2']['conv_1']['kernel'])
    rel[init] = np.linalg.norm(k1 - k0) / np.linalg.norm(k0)
  assert rel['xavier'] > 0.05 and rel['torch_default'] < 0.02, rel

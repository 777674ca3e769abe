"""Backbone stage end to end on the tiny config: train, samples/TensorBoard/checkpoints, exact
resume after SIGTERM (4 steps == 2 + kill + resume 2), EMA generator for later stages."""
import glob
import os
import signal

import jax
import numpy as np
import pytest

from fiancee_jax import config as cfg
from fiancee_jax.train import backbone, checkpoint


def _config(num_steps, data_dir):
  c = cfg.load(os.path.join(os.path.dirname(__file__), '..', 'configs', 'oasis_synthetic.py'),
               'tiny')
  c.train.num_steps = num_steps
  c.data.data_dir = str(data_dir)
  return c


def _sigterm_after(n):
  def hook(step, state, metrics):  # noqa: ARG001
    if step == n:
      os.kill(os.getpid(), signal.SIGTERM)   # the real signal path: finish step, save, return
  return hook


def test_resume_after_sigterm_is_exact(tmp_path):
  data = tmp_path / 'data'
  straight = backbone.train_and_evaluate(_config(4, data), str(tmp_path / 'a'))
  assert int(straight.step) == 4

  wd = str(tmp_path / 'b')
  stopped = backbone.train_and_evaluate(_config(4, data), wd, hooks=[_sigterm_after(2)])
  assert int(stopped.step) == 2
  ckdir = checkpoint.checkpoint_dir(wd, 'backbone')
  assert sorted(os.listdir(ckdir)) == ['2']
  resumed = backbone.train_and_evaluate(_config(4, data), wd)
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


def test_other_config_in_workdir_is_refused(tmp_path):
  c = _config(0, tmp_path / 'data')  # 0 steps: writes the initial checkpoint only
  backbone.train_and_evaluate(c, str(tmp_path / 'w'))
  other = _config(0, tmp_path / 'data')
  other.model.spade_hidden = 16
  with pytest.raises(checkpoint.CheckpointError, match='was written for config hash'):
    backbone.train_and_evaluate(other, str(tmp_path / 'w'))


def test_unsupported_settings_are_clear_errors(tmp_path):
  c = _config(1, tmp_path / 'data')
  c.train.vgg_lambda = 1.0
  with pytest.raises(NotImplementedError, match='vgg_lambda'):
    backbone.build_models(c)

"""Data parallel: one OASIS step on 4 fake devices (shard_map and pmap) equals one step on one
device on the same global batch (sync BN + global class weights + per-example z make it so)."""
import os

import jax
import numpy as np
import pytest

from fiancee_jax import config as cfg
from fiancee_jax import registry
from fiancee_jax.train import gan, parallel


@pytest.fixture(scope='module')
def setup():
  c = cfg.load(os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'oasis_synthetic.py'),
               'tiny')
  bb = registry.get(c)
  comp = gan.compiled(bb)   # shard_map over all 4 devices
  models, dp4 = comp.task, comp.step
  state0 = gan.step_state(models, gan.create_train_state(bb, comp))
  rng = np.random.default_rng(0)
  h, w = c.data.height, c.data.width
  labels = rng.integers(0, 6, (4, h, w)).astype(np.uint8)
  labels[:, :8] = rng.integers(20, 27, (4, 8, w))  # a few more classes, some rare
  batch = {'image': rng.integers(0, 256, (4, h, w, 3)).astype(np.uint8), 'label': labels}
  dp1 = parallel.wrap(models.train_step, 'shard_map', devices=jax.devices()[:1])
  ref, ref_metrics = dp1(dp1.put_state(state0), dp1.put_batch(batch))
  return c, models, dp4, state0.train, batch, dp1.get_state(ref.train), ref_metrics


def _assert_close(a, b, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


def test_single_step_sane(setup):
  c, _, _, state0, _, ref, metrics = setup
  assert jax.device_count() == 4
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert int(ref.step) == 1
  changed = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), ref.params_g, state0.params_g)
  assert max(jax.tree.leaves(changed)) > 1e-5
  changed_d = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), ref.params_d, state0.params_d)
  assert max(jax.tree.leaves(changed_d)) > 1e-5
  d = c.train.ema_decay  # EMA after one step: decay * init + (1 - decay) * new
  _assert_close(ref.ema_params_g,
                jax.tree.map(lambda p0, p1: d * p0 + (1 - d) * p1, state0.params_g, ref.params_g),
                atol=1e-7)
  assert not np.allclose(ref.state_g['batch_stats']['body_0']['norm_0']['first_norm']['mean'],
                         state0.state_g['batch_stats']['body_0']['norm_0']['first_norm']['mean'])


@pytest.mark.parametrize('mode', ['shard_map', 'pmap'])
def test_four_devices_equal_one(setup, mode):
  _, models, dp4, state0, batch, ref, ref_metrics = setup
  dp = dp4 if mode == 'shard_map' else parallel.wrap(models.train_step, 'pmap')
  assert dp.num_devices == 4
  out, metrics = dp(dp.put_state(gan.step_state(models, state0)), dp.put_batch(batch))
  out = dp.get_state(out.train)
  for k in ref_metrics:
    np.testing.assert_allclose(float(metrics[k]), float(ref_metrics[k]), rtol=1e-4, atol=1e-5)
  _assert_close(out.params_g, ref.params_g, atol=2e-5)
  _assert_close(out.params_d, ref.params_d, atol=2e-5)
  _assert_close(out.state_g, ref.state_g, atol=2e-5)   # synced running stats, SN vectors
  _assert_close(out.opt_g, ref.opt_g, atol=2e-5)       # Adam mu = the gradient (beta1 = 0)


def test_batch_must_split_over_devices():
  with pytest.raises(ValueError, match='multiple of the number of devices'):
    parallel.check_batch_size(6, 4)
  with pytest.raises(ValueError, match="parallel='nope'"):
    parallel.wrap(lambda s, b, axis_name: (s, {}), 'nope')


def test_vgg_loss_in_generator_step(setup):
  """train.vgg_lambda > 0 adds the OASIS VGG term to G's loss: reported and it moves G."""
  c, _, _, state0, batch, ref, _ = setup
  c = cfg.load(os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'oasis_synthetic.py'),
               'tiny')
  with c.unlocked():
    c.train.vgg_lambda = 10.0
  models = registry.get(c).gan_task(parallel.AXIS)
  dp1 = parallel.wrap(models.train_step, 'shard_map', devices=jax.devices()[:1])
  carry = gan.step_state(models, state0)
  assert set(carry.frozen) == {'vgg'}
  out, metrics = dp1(dp1.put_state(carry), dp1.put_batch(batch))
  assert np.isfinite(float(metrics['g_vgg'])) and float(metrics['g_vgg']) > 0
  out = dp1.get_state(out.train)
  _assert_close(out.params_d, ref.params_d, atol=1e-6)   # D's update does not see the VGG term
  diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), out.params_g, ref.params_g)
  assert max(jax.tree.leaves(diff)) > 1e-6

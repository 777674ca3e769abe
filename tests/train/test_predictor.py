"""Predictor stage: the models (Table S7), the losses, a training step, the relative error."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax import config as cfg
from fiancee_jax import registry
from fiancee_jax.core import predictor_model
from fiancee_jax.train import predictor as tp
from tests.conftest import tiny_config


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_relative_error_definition():
  pred = np.array([[1.0, 2.0], [3.0, 2.0]])
  true = np.array([[2.0, 2.0], [2.0, 6.0]])
  # mean |pred - true| / mean true per exit: (1+1)/2 / 2 = 0.5 ; (0+4)/2 / 4 = 0.5
  np.testing.assert_allclose(tp.relative_error(pred, true), [0.5, 0.5])


def test_train_step_lowers_loss():
  c = tiny_config()
  c.predictor.num_steps = 100   # the cosine schedule decays over num_steps (tiny: 2)
  bb = registry.get(c)
  model = bb.predictor()
  tx = tp.make_optimizer(c)
  shape = tp.input_shape(bb)
  state = tp.create_state(bb, shape, model, tx)
  rng = np.random.default_rng(0)
  batch = {'feats': jnp.asarray(rng.normal(size=(4,) + shape), jnp.float32),
           'targets': jnp.asarray(rng.uniform(0.1, 0.6, size=(4, len(c.branches.exits))),
                                  jnp.float32)}
  step = jax.jit(functools.partial(tp.train_step, model=model, tx=tx, loss='mse', axis_name=None))
  losses = []
  for _ in range(20):
    state, m = step(state, batch)
    losses.append(float(m['loss']))
  assert losses[-1] < losses[0] * 0.9, losses
  assert int(state['step']) == 20


def test_missing_stage_is_one_clear_error(tmp_path):
  with pytest.raises(ValueError, match='predictor'):
    tp.restore_params(registry.get(tiny_config()), str(tmp_path))


def test_oasis_predictor_paper_size_matches_table_s7(repo):
  c = cfg.load(str(repo / 'configs' / 'oasis_cityscapes.py'))
  model = registry.get(c).predictor()
  feat = jax.ShapeDtypeStruct((1, 8, 16, 1024), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), feat)
  # Table S7: flatten width 10752 (= 3x7x512) and 58M parameters in all.
  assert params['params']['fc0']['kernel'].shape == (10752, 4096)
  assert abs(_count(params) / 1e6 - 58.0) < 1.0


def test_predictor_tiny_forward_and_losses(repo):
  c = cfg.load(str(repo / 'configs' / 'oasis_synthetic.py'), 'tiny')
  model = registry.get(c).predictor()
  feat = jnp.ones((3, 2, 2, 64))
  params = model.init(jax.random.key(0), feat)
  out = model.apply(params, feat)
  assert out.shape == (3, len(c.branches.exits))
  t = jnp.zeros_like(out)
  np.testing.assert_allclose(tp.loss_fn(out, t, 'mse'), jnp.mean(out ** 2), rtol=1e-6)
  np.testing.assert_allclose(tp.loss_fn(out, t, 'mae'), jnp.mean(jnp.abs(out)), rtol=1e-6)
  with pytest.raises(ValueError, match='mse'):
    tp.loss_fn(out, t, 'huber')


def test_motion_predictor_shapes(repo):
  c = cfg.load(os.path.join(str(repo), 'configs', 'megaportraits_voxceleb2.py'))
  model = registry.get(c).predictor()
  keys = jnp.zeros((2, 3 + c.model.expr_dim))
  params = model.init(jax.random.key(0), keys)
  assert model.apply(params, keys).shape == (2, 3)
  # Table S7: about 1M parameters.
  assert 0.3 < _count(params) / 1e6 < 1.5


def _lpips_like_task(n, shape, num_exits, seed):
  """Rows whose targets, in a narrow LPIPS-like band (mean ~0.08, std ~0.015), depend linearly
  on the features: a predictor that learns anything beats predicting the mean."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n,) + shape).astype(np.float32)
  w = np.random.default_rng(99).normal(size=(4, num_exits)) / 2
  signal = x.reshape(n, -1, shape[-1])[..., :4].mean(1) * np.sqrt(x[0].size // shape[-1])
  y = 0.08 + 0.015 * (signal @ w) + np.array([0.0, 0.002, -0.003, -0.02][:num_exits])
  return x, y.astype(np.float32)


def test_target_norm_keeps_train_stats_frozen_and_beats_the_mean():
  c = tiny_config()
  c.predictor.optimizer, c.predictor.lr, c.predictor.target_norm = 'adam_cosine', 3e-3, True
  c.predictor.num_steps = 600
  bb = registry.get(c)
  shape, e = tp.input_shape(bb), len(c.branches.exits)
  x, y = _lpips_like_task(4096, shape, e, 0)
  xt, yt = _lpips_like_task(256, shape, e, 1)
  model, tx = predictor_model.model(bb), tp.make_optimizer(c)
  state = tp.create_state(bb, shape, model, tx, y)
  np.testing.assert_allclose(state['params']['target_mean'], y.mean(0), rtol=1e-5)
  np.testing.assert_allclose(state['params']['target_std'], y.std(0), rtol=1e-4)
  stats0 = {k: np.array(state['params'][k]) for k in predictor_model.FROZEN}
  step = jax.jit(functools.partial(tp.train_step, model=model, tx=tx, loss='mse', axis_name=None))
  rng = np.random.default_rng(0)
  for _ in range(c.predictor.num_steps):
    b = rng.integers(0, len(x), 64)
    state, _ = step(state, {'feats': jnp.asarray(x[b]), 'targets': jnp.asarray(y[b])})
  for k, v in stats0.items():   # frozen: the optimiser's update is exactly zero
    np.testing.assert_array_equal(np.asarray(state['params'][k]), v)
  pred = tp.predict(model, state['params'], xt)
  learnt = tp.relative_error(pred, yt).mean()
  mean_only = tp.relative_error(np.broadcast_to(y.mean(0), yt.shape), yt).mean()
  assert learnt < 0.4 * mean_only, (learnt, mean_only)


def test_target_norm_predicts_net_times_std_plus_mean():
  c = tiny_config()
  c.predictor.target_norm = True
  bb = registry.get(c)
  shape, e = tp.input_shape(bb), len(c.branches.exits)
  model = predictor_model.model(bb)
  params = model.init(jax.random.key(0), jnp.zeros((1,) + shape))['params']
  y = np.random.default_rng(0).uniform(0.05, 0.1, (32, e)).astype(np.float32)
  params = predictor_model.set_target_stats(params, y)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3,) + shape), jnp.float32)
  net = bb.predictor().apply({'params': params['net']}, x)
  np.testing.assert_allclose(model.apply({'params': params}, x),
                             net * y.std(0) + y.mean(0), rtol=1e-5, atol=1e-6)


def test_unknown_predictor_optimizer_is_one_clear_error():
  c = tiny_config()
  c.predictor.optimizer = 'lamb'
  with pytest.raises(ValueError, match="predictor.optimizer=.lamb.: expected one of"):
    cfg.validate(c)

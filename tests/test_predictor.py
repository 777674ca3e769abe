import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax import config as cfg
from fiancee_jax.models import predictor


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_oasis_predictor_paper_size_matches_table_s7(repo):
  c = cfg.load(str(repo / 'configs' / 'oasis_cityscapes.py'))
  model = predictor.from_config(c)
  feat = jax.ShapeDtypeStruct((1, 8, 16, 1024), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), feat)
  # Table S7: flatten width 10752 (= 3x7x512) and 58M parameters in all.
  assert params['params']['fc0']['kernel'].shape == (10752, 4096)
  assert abs(_count(params) / 1e6 - 58.0) < 1.0


def test_predictor_tiny_forward_and_losses(repo):
  c = cfg.load(str(repo / 'configs' / 'oasis_synthetic.py'), 'tiny')
  model = predictor.from_config(c)
  feat = jnp.ones((3, 2, 2, 64))
  params = model.init(jax.random.key(0), feat)
  out = model.apply(params, feat)
  assert out.shape == (3, len(c.branches.exits))
  t = jnp.zeros_like(out)
  np.testing.assert_allclose(predictor.loss_fn(out, t, 'mse'), jnp.mean(out ** 2), rtol=1e-6)
  np.testing.assert_allclose(predictor.loss_fn(out, t, 'mae'), jnp.mean(jnp.abs(out)), rtol=1e-6)
  with pytest.raises(ValueError, match='mse'):
    predictor.loss_fn(out, t, 'huber')


def test_motion_predictor_shapes(repo):
  c = cfg.load(str(repo / 'configs' / 'megaportraits_voxceleb2.py'))
  model = predictor.from_config(c)
  keys = jnp.zeros((2, 3 + c.model.expr_dim))
  params = model.init(jax.random.key(0), keys)
  assert model.apply(params, keys).shape == (2, 3)
  # Table S7: about 1M parameters.
  assert 0.3 < _count(params) / 1e6 < 1.5

"""`train.remat` (nn.remat of the generators' blocks) is a contract: the same parameter tree,
loss, gradients and mutated collections with it on or off; and bench/train_memory.py's
compiled-memory measurement on the tiny OASIS config."""
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax import config as cfg
from fiancee_jax.backbones.megaportraits import model as heads
from fiancee_jax.backbones.oasis import model as oasis
from tests.conftest import REPO, heads_config, tiny_config

sys.path.insert(0, str(REPO))
from bench import train_memory  # noqa: E402


def _paths(tree):
  return {jax.tree_util.keystr(p): (x.shape, x.dtype)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _with_remat(config, remat):
  config.train.remat = remat
  return cfg.validate(config)


def _loss_and_grads(model, variables, args):
  """Train-mode loss (mean |image|^2 + mean of the last block) and its gradients w.r.t. the
  params, plus the mutated collections (sync BN stats, spectral-norm vectors)."""
  params = variables['params']
  rest = {k: v for k, v in variables.items() if k != 'params'}

  def loss(p):
    (img, feats), new = model.apply({'params': p, **rest}, *args, train=True,
                                    mutable=list(rest))
    last = feats[sorted(k for k in feats if k.startswith('block'))[-1]]
    return jnp.mean(img ** 2) + jnp.mean(last), new
  (value, new), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, grads, new


def _check_equal(model_fn, args, init_args):
  off, on = model_fn(False), model_fn(True)
  key = jax.random.PRNGKey(0)
  v_off = jax.jit(lambda k: off.init(k, *init_args))(key)
  v_on = jax.jit(lambda k: on.init(k, *init_args))(key)
  # Same names, shapes (a checkpoint of one loads into the other) and even init values.
  assert _paths(v_off) == _paths(v_on)
  for a, b in zip(jax.tree.leaves(v_off), jax.tree.leaves(v_on)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  l_off, g_off, n_off = _loss_and_grads(off, flax.core.unfreeze(v_off), args)
  l_on, g_on, n_on = _loss_and_grads(on, flax.core.unfreeze(v_off), args)
  np.testing.assert_allclose(float(l_on), float(l_off), rtol=1e-6)
  # Float tolerance: the recomputed forward is fused and summed in another order (seen:
  # 3e-6 absolute on gradients of size 0.15; 1e-7 on biases before a batch norm, whose exact
  # gradient is 0): relative to the largest gradient, and to each collection leaf's size.
  g_scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_off))
  assert g_scale > 0
  for tree_off, tree_on, per_leaf in ((g_off, g_on, False), (n_off, n_on, True)):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree_off),
                            jax.tree.leaves(tree_on)):
      a, b = np.asarray(a), np.asarray(b)
      scale = float(np.abs(a).max()) if per_leaf else g_scale
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * scale + 1e-8,
                                 err_msg=jax.tree_util.keystr(path))


def test_oasis_remat_same_params_loss_and_grads():
  c = tiny_config()
  d = c.data
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, d.num_classes, (2, d.height, d.width)), jnp.int32)
  z = jnp.asarray(rng.normal(size=(2, c.model.z_dim)), jnp.float32)
  _check_equal(lambda r: oasis.from_config(_with_remat(tiny_config(), r)), (ids, z), (ids, z))


def test_heads_remat_same_params_loss_and_grads():
  c = heads_config()
  h = c.data.height
  rng = np.random.default_rng(0)
  src, drv = (jnp.asarray(rng.uniform(-1, 1, (2, h, h, 3)), jnp.float32) for _ in range(2))
  _check_equal(lambda r: heads.from_config(_with_remat(heads_config(), r)), (src, drv),
               (src, drv))


def test_remat_changes_the_compile_key_only():
  from fiancee_jax import registry
  a, b = tiny_config(), _with_remat(tiny_config(), True)
  assert cfg.config_hash(a, ('model', 'disc')) == cfg.config_hash(b, ('model', 'disc'))
  assert registry.get(a).gan_task(None).compile_key() != registry.get(b).gan_task(None).compile_key()
  bad = tiny_config()
  with pytest.raises(TypeError):
    bad.train.remat = 'yes'   # the locked schema's type check


@pytest.fixture(scope='module')
def rows():
  c = tiny_config()
  return {r: train_memory.measure(c, 1, r, tflops=100.0, epoch_examples=16) for r in (False, True)}


def test_memory_bench_tiny(rows):
  off, on = rows[False], rows[True]
  for r in (off, on):
    assert r['argument_bytes'] > 0 and r['output_bytes'] > 0 and r['temp_bytes'] > 0
    assert r['peak_bytes'] == (r['argument_bytes'] + r['output_bytes'] + r['temp_bytes']
                               - r['alias_bytes'])
    # The state is donated: the new state is written into its buffers.
    assert 0 < r['alias_bytes'] <= r['argument_bytes']
    assert r['gmacs_per_step'] > 0 and r['s_per_epoch'] > 0
  # Same program inputs and outputs; remat keeps fewer activations and recomputes forwards.
  assert on['argument_bytes'] == off['argument_bytes']
  assert on['temp_bytes'] <= off['temp_bytes']
  assert on['gmacs_per_step'] >= off['gmacs_per_step']
  table = train_memory.table([off, on])
  assert table.count('\n') == 3 and '| oasis_synthetic | on |' in table

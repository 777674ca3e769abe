"""Checkpointer: keep-last-K, exact round trip, config mismatch and corrupt files -> one clear error."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax import workdir as wdir
from fiancee_jax import config as cfg
from fiancee_jax.train import checkpoint
from fiancee_jax.train.state import GANState, adam


def _config(arg='tiny'):
  return cfg.load(os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'oasis_synthetic.py'),
                  arg)


def _state(seed=0):
  k = jax.random.PRNGKey(seed)
  p = {'conv': {'kernel': jax.random.normal(k, (3, 3, 2, 4)), 'bias': jnp.arange(4.0)}}
  coll = {'batch_stats': {'mean': jnp.full((4,), 0.5)}, 'spectral': {'u': jnp.ones((4,))}}
  tx = adam(1e-3, 0.0, 0.999, 0.0)
  return GANState(step=jnp.int32(7), params_g=p, params_d=p, state_g=coll,
                  state_d={'spectral': {'u': jnp.ones((2,))}}, ema_params_g=p, ema_state_g=coll,
                  opt_g=tx.init(p), opt_d=tx.init(p), rng=jax.random.PRNGKey(seed + 1))


def _item(s):
  return {'train': s, 'ema_bn': s.ema_state_g}


def test_round_trip_keep_last_k_and_load_backbone(tmp_path):
  c = _config()
  ck = checkpoint.Checkpointer(str(tmp_path), 'backbone', c, keep=2)
  for step in (1, 2, 3):
    ck.save(step, _item(_state(step)), {'data': {'epoch': 0, 'batch': step}})
  ck.close()
  steps = sorted(int(d) for d in os.listdir(wdir.checkpoint_dir(str(tmp_path), 'backbone'))
                 if d.isdigit())
  assert steps == [2, 3]
  restored, meta = checkpoint.restore_latest(str(tmp_path), 'backbone', _item(_state(0)), c)
  want = _state(3)
  assert isinstance(restored['train'], GANState)
  for a, b in zip(jax.tree.leaves(restored['train']), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert meta['data'] == {'epoch': 0, 'batch': 3} and meta['stage'] == 'backbone'
  params, coll, _ = checkpoint.load_backbone(str(tmp_path), c)
  np.testing.assert_array_equal(np.asarray(params['conv']['kernel']),
                                np.asarray(want.ema_params_g['conv']['kernel']))
  assert set(coll) == {'batch_stats', 'spectral'}
  assert checkpoint.restore_latest(str(tmp_path / 'empty'), 'backbone', _item(_state())) is None


def test_other_config_is_one_clear_error(tmp_path):
  ck = checkpoint.Checkpointer(str(tmp_path), 'backbone', _config('tiny'))
  ck.save(1, _item(_state()))
  ck.close()
  other = _config(None)  # the default synthetic config: other widths and resolution
  with pytest.raises(checkpoint.CheckpointError, match='was written for config hash .* this '
                     'config is'):
    checkpoint.restore_latest(str(tmp_path), 'backbone', _item(_state()), other)
  with pytest.raises(checkpoint.CheckpointError, match='was written for config hash'):
    checkpoint.load_backbone(str(tmp_path), other)
  with pytest.raises(checkpoint.CheckpointError, match='no backbone checkpoint'):
    checkpoint.load_backbone(str(tmp_path / 'nothing'), other)


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
  c = _config()
  ck = checkpoint.Checkpointer(str(tmp_path), 'backbone', c)
  ck.save(1, _item(_state()))
  ck.close()
  shutil.rmtree(os.path.join(wdir.checkpoint_dir(str(tmp_path), 'backbone'), '1', 'state'))
  with pytest.raises(checkpoint.CheckpointError, match='cannot restore checkpoint'):
    checkpoint.restore_latest(str(tmp_path), 'backbone', _item(_state()), c)


def test_export_keeps_only_the_named_entries_and_the_meta(tmp_path):
  """What `assets/` ships: the branch variables and the metadata, not the training state."""
  c = _config()
  src, dst = str(tmp_path / 'src'), str(tmp_path / 'dst')
  ck = checkpoint.Checkpointer(src, 'branches', c)
  variables = {'params': {'w': np.arange(6.0).reshape(2, 3)}}
  ck.save(5, {'train': _item(_state()), 'branches': variables}, {'data': {'epoch': 1}})
  ck.close()
  path = checkpoint.export(src, 'branches', dst, keep=('branches',))
  assert path.endswith(os.path.join('branches', '5'))
  out = checkpoint.Checkpointer(dst, 'branches', c, read_only=True)
  try:
    meta = out.read_meta()
    state = out.manager.restore(5, args=checkpoint.ocp.args.Composite(
        state=checkpoint.ocp.args.StandardRestore()))['state']
  finally:
    out.close()
  assert sorted(state) == ['branches']
  np.testing.assert_array_equal(state['branches']['params']['w'], variables['params']['w'])
  assert meta['exported'] == ['branches'] and meta['data'] == {'epoch': 1}
  assert meta['model_hash'] == cfg.config_hash(c)
  with pytest.raises(checkpoint.CheckpointError, match='no .*nothing'):
    checkpoint.export(src, 'branches', str(tmp_path / 'x'), keep=('nothing',))

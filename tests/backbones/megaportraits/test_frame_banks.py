"""MegaPortraits frame banks (backbones/megaportraits/frame_banks.py): a bank per identity
(build, skip, force, layout), both retrieval backends agree with brute force, stale / foreign
banks are refused."""
import os

import jax
import numpy as np
import pytest

from fiancee_jax import registry
from fiancee_jax import workdir as wdir
from fiancee_jax.backbones.megaportraits import frame_banks
from fiancee_jax.core import bank as bank_lib
from fiancee_jax.core import stages
from fiancee_jax.core.pipeline import PipelineError
from fiancee_jax.data import heads as heads_data
from tests.conftest import heads_config, heads_workdir


def _load(c, wd, identity, backbone_step=None):
  bb = registry.get(c)
  return frame_banks.load_bank(c, bb.bank_shapes(), wd, identity, backbone_step)


def test_build_frame_banks_layout_skip_force(tmp_path_factory, capsys):
  c, wd, st = heads_workdir(tmp_path_factory)
  bb = registry.get(c)
  out = stages.build_bank(bb, wd, batch_size=3, progress=False)   # 4 frames: 3 + padded 1
  assert sorted(out) == [0, 1, 2, 3, 4]
  n, size = c.bank.frames_per_identity, c.data.height
  first = c.data.frames_per_identity
  m = out[3]
  assert m['count'] == n and m['grid'] == [1, 1] and m['num_classes'] == 1
  assert m['key_dim'] == 3 + c.model.expr_dim and m['value_shape'] == [size, size, 3]
  assert m['backbone_step'] == 1 and m['meta']['identity'] == 3
  assert m['meta']['frame_ids'] == [first, first + n]   # not the dataset's frames 0..F-1
  bank = _load(c, wd, 3, backbone_step=1)
  # values = the identity's rendered frames; keys = the backbone's motion code of each frame
  frames = np.stack([heads_data.render_frame(c.data.seed, 3, f, size)['image']
                     for f in range(first, first + n)]).astype(np.float32) / 127.5 - 1
  model = bb.generator()
  want = frame_banks.motion_keys(model, {'params': st.ema_params_g, **st.ema_state_g},
                                   frames)
  order = [int(np.argmin(np.abs(frames - v).sum((1, 2, 3)))) for v in np.asarray(bank.values)]
  assert sorted(order) == list(range(n))
  np.testing.assert_allclose(np.asarray(bank.values), frames[order], atol=1e-6)
  np.testing.assert_allclose(np.asarray(bank.keys), np.asarray(want)[order], rtol=1e-4,
                             atol=1e-4)
  # up to date: kept; --force: rebuilt, same content
  capsys.readouterr()
  mf = os.path.join(wdir.identity_bank_dir(wd, 3), 'manifest.json')
  before = os.stat(mf).st_mtime_ns
  stages.build_bank(bb, wd, progress=False)
  assert '0 frame banks built, 5 up to date' in capsys.readouterr().out
  assert os.stat(mf).st_mtime_ns == before
  gen_vars, meta = stages.load_backbone(bb, wd)
  m8 = bb.build_bank(wd, gen_vars, meta['step'], force=True, batch_size=8, progress=False,
                    identities=[3])[3]
  assert os.stat(mf).st_mtime_ns != before
  assert m8['files'] == m['files']   # read batch 3 vs 8: the same bits (sha256 per file)


def _brute_force(keys, key_cls, queries, q_cls):
  d = ((np.asarray(queries, np.float64)[:, None] - np.asarray(keys, np.float64)[None]) ** 2)
  d = np.where(np.asarray(key_cls)[None] == np.asarray(q_cls)[:, None], d.sum(-1), np.inf)
  return d.argmin(1)


def test_backends_retrieve_the_same_frame(tmp_path_factory):
  c, wd, st = heads_workdir(tmp_path_factory)
  bb = registry.get(c)
  stages.build_bank(bb, wd, progress=False)
  fb = bb.load_bank(wd, None, identities=[4, 0, 2])   # stacked: class i = identity [4, 0, 2][i]
  assert fb.bank.keys.shape[0] == 3 * c.bank.frames_per_identity
  rng = np.random.default_rng(0)
  keys = np.asarray(fb.bank.keys)
  # queries near bank keys of random classes, and far-off ones
  rows = rng.integers(0, len(keys), 24)
  queries = np.concatenate([keys[rows] + 0.01 * rng.normal(size=(24, keys.shape[1])),
                            rng.normal(size=(8, keys.shape[1])) * 3]).astype(np.float32)
  ident = np.asarray([4, 0, 2])[rng.integers(0, 3, len(queries))]
  want = _brute_force(keys, np.asarray(fb.bank.key_classes), queries, fb.slots[ident])
  got = {}
  for backend in ('device', 'faiss'):
    fn = jax.jit(lambda b, s, q, i, be=backend: frame_banks.retrieve_frame(b, s, q, i, be))
    got[backend] = np.asarray(fn(fb.bank, fb.slots, queries, ident))
    np.testing.assert_array_equal(got[backend], np.asarray(fb.bank.values)[want])
  # each example's frame comes from its own identity's bank
  for q, i in zip(got['device'], ident):
    own = np.asarray(_load(c, wd, int(i)).values)
    assert np.abs(own - q).sum((1, 2, 3)).min() == 0


def test_stale_or_foreign_banks_are_refused(tmp_path_factory, tmp_path):
  c, wd, _ = heads_workdir(tmp_path_factory)
  bb = registry.get(c)
  stages.build_bank(bb, wd, progress=False)
  with pytest.raises(PipelineError, match=r'backbone_step.*build_bank\.py'):
    _load(c, wd, 1, backbone_step=99)
  other = heads_config(c.data.data_dir)
  other.model.expr_dim = 8
  with pytest.raises(PipelineError, match=r'config_hash.*key_dim.*build_bank\.py'):
    _load(other, wd, 1)
  with pytest.raises(PipelineError, match=r'no frame bank for identity 7.*build_bank'):
    bb.load_bank(wd, None, identities=[0, 7])
  with pytest.raises(PipelineError, match=r'no backbone.*--stage=backbone'):
    stages.build_bank(bb, str(tmp_path / 'empty'), progress=False)
  two = bank_lib.make_bank(np.zeros((2, 3)), np.zeros((2, 1, 1, 3)), [0, 1])
  with pytest.raises(bank_lib.BankError, match='one-class'):
    bank_lib.stack([two])

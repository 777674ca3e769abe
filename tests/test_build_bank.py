"""build_bank (fiancee.build_bank / build_bank.py): end to end in a temp workdir, skip, force;
load_pipeline errors name the missing stage and the command that makes it."""
import os
import shutil

import numpy as np
import pytest

from fiancee_jax import bank as bank_lib
from fiancee_jax import fiancee
from tests.test_fiancee import backbone_workdir, tiny_config


def test_load_pipeline_names_missing_stage(tmp_path, tmp_path_factory):
  c = tiny_config(tmp_path / 'data')
  with pytest.raises(fiancee.PipelineError, match=r'no backbone.*train\.py.*--stage=backbone'):
    fiancee.load_pipeline(c, str(tmp_path / 'empty'))
  c, wd, _ = backbone_workdir(tmp_path_factory)
  other = str(tmp_path / 'wd_backbone_only')
  shutil.copytree(os.path.join(wd, 'checkpoints', 'backbone'),
                  os.path.join(other, 'checkpoints', 'backbone'))
  with pytest.raises(fiancee.PipelineError, match=r'no bank in .*build_bank\.py'):
    fiancee.load_pipeline(c, other, stages=('backbone', 'bank'))
  with pytest.raises(fiancee.PipelineError, match=r'no branches checkpoint.*--stage=branches'):
    fiancee.load_pipeline(c, other, stages=('backbone', 'branches'))
  with pytest.raises(fiancee.PipelineError, match=r'no predictor checkpoint.*--stage=predictor'):
    fiancee.load_pipeline(c, other, stages=('backbone', 'predictor'))


def test_build_bank_end_to_end_skip_and_force(tmp_path_factory, capsys):
  c, wd, _ = backbone_workdir(tmp_path_factory)
  m = fiancee.build_bank(c, wd, batch_size=3, progress=False)  # 4 maps x 2 noises, padded
  b = c.bank
  grid = [c.data.height // 32, c.data.width // 32]
  assert m['grid'] == grid and m['backbone_step'] == 1
  assert m['num_inputs'] == b.num_maps * b.num_noises
  assert sum(m['keys_seen'].values()) == b.num_maps * b.num_noises * grid[0] * grid[1]
  assert all(v <= b.max_per_class for v in m['class_sizes'].values())
  noises = np.load(os.path.join(wd, 'bank', 'noises.npy'))
  np.testing.assert_array_equal(noises, fiancee.fixed_noises(c))
  assert noises.shape == (b.num_noises, c.model.z_dim)
  bank = fiancee.load_bank(c, wd, backbone_step=1)
  # every stored key is a block-1 feature of one of the (map, noise) inputs
  from fiancee_jax import data
  src = data.source(c.data, 'train', c.data.data_dir)
  gen = fiancee.build_modules(c)[0]
  from fiancee_jax.train import checkpoint
  gp, gc, _ = checkpoint.load_backbone(wd, c)
  import jax
  ids = m['meta']['map_ids']
  labels = np.stack([np.asarray(src[i]['label'], np.int32) for i in ids for _ in range(2)])
  z = np.tile(noises, (len(ids), 1))
  keys, values, classes = fiancee.bank_features(
      gen, {'params': gp, **gc}, jax.nn.one_hot(labels, c.data.num_classes), z)
  flat = np.asarray(keys).reshape(-1, keys.shape[-1])
  d = ((np.asarray(bank.keys)[:, None] - flat[None]) ** 2).sum(-1).min(1)
  assert d.max() < 1e-8
  capsys.readouterr()
  fiancee.build_bank(c, wd, progress=False)
  assert 'up to date' in capsys.readouterr().out
  before = os.stat(os.path.join(wd, 'bank', 'manifest.json')).st_mtime_ns
  fiancee.build_bank(c, wd, force=True, batch_size=8, progress=False)
  assert os.stat(os.path.join(wd, 'bank', 'manifest.json')).st_mtime_ns != before
  np.testing.assert_array_equal(fiancee.load_bank(c, wd).keys, bank.keys)  # deterministic


def test_bank_of_another_config_is_refused(tmp_path_factory):
  c, wd, _ = backbone_workdir(tmp_path_factory)
  if not os.path.exists(os.path.join(wd, 'bank', 'manifest.json')):
    fiancee.build_bank(c, wd, progress=False)
  with pytest.raises(fiancee.PipelineError, match='backbone_step'):
    fiancee.load_bank(c, wd, backbone_step=99)

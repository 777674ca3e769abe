"""core/stages.py: the bank stage (build_bank.py): end to end in a temp workdir, skip, force;
load_pipeline errors name the missing stage and the command that makes it."""
import os
import shutil

import jax
import numpy as np
import pytest

from fiancee_jax import data, registry
from fiancee_jax.backbones.oasis import bank_inputs
from fiancee_jax.core import stages
from fiancee_jax.core.pipeline import PipelineError
from tests.conftest import REPO, backbone_workdir, tiny_config


def _load_bank(c, wd, backbone_step=None):
  return registry.get(c).load_bank(wd, backbone_step)


def test_load_pipeline_names_missing_stage(tmp_path, tmp_path_factory):
  c = tiny_config(tmp_path / 'data')
  with pytest.raises(PipelineError, match=r'no backbone.*train\.py.*--stage=backbone'):
    stages.load_pipeline(registry.get(c), str(tmp_path / 'empty'))
  c, wd, _ = backbone_workdir(tmp_path_factory)
  other = str(tmp_path / 'wd_backbone_only')
  shutil.copytree(os.path.join(wd, 'checkpoints', 'backbone'),
                  os.path.join(other, 'checkpoints', 'backbone'))
  with pytest.raises(PipelineError, match=r'no bank in .*build_bank\.py'):
    stages.load_pipeline(registry.get(c), other, stages=('backbone', 'bank'))
  with pytest.raises(PipelineError, match=r'no branches checkpoint.*--stage=branches'):
    stages.load_pipeline(registry.get(c), other, stages=('backbone', 'branches'))
  with pytest.raises(PipelineError, match=r'no predictor checkpoint.*--stage=predictor'):
    stages.load_pipeline(registry.get(c), other, stages=('backbone', 'predictor'))


def test_build_bank_end_to_end_skip_and_force(tmp_path_factory, capsys):
  c, wd, _ = backbone_workdir(tmp_path_factory)
  c = c.copy_and_resolve_references()
  c.bank.compute_batch = 4   # 8 inputs: read batches of 3 are re-cut into backbone calls of 4
  m = stages.build_bank(registry.get(c), wd, batch_size=3, progress=False)  # 4 maps x 2 noises
  b = c.bank
  grid = [c.data.height // 32, c.data.width // 32]
  assert m['grid'] == grid and m['backbone_step'] == 1
  assert m['num_inputs'] == b.num_maps * b.num_noises
  assert sum(m['keys_seen'].values()) == b.num_maps * b.num_noises * grid[0] * grid[1]
  assert all(v <= b.max_per_class for v in m['class_sizes'].values())
  noises = np.load(os.path.join(wd, 'bank', 'noises.npy'))
  np.testing.assert_array_equal(noises, bank_inputs.fixed_noises(c))
  assert noises.shape == (b.num_noises, c.model.z_dim)
  bank = _load_bank(c, wd, backbone_step=1)
  # every stored key is a block-1 feature of one of the (map, noise) inputs
  src = data.source(c.data, 'train', c.data.data_dir)
  bb = registry.get(c)
  gen = bb.generator()
  gen_vars, _ = stages.load_backbone(bb, wd)
  ids = m['meta']['map_ids']
  labels = np.stack([np.asarray(src[i]['label'], np.int32) for i in ids for _ in range(2)])
  z = np.tile(noises, (len(ids), 1))
  keys, values, classes = bank_inputs.bank_features(
      gen, gen_vars, jax.nn.one_hot(labels, c.data.num_classes), z)
  flat = np.asarray(keys).reshape(-1, keys.shape[-1])
  d = ((np.asarray(bank.keys)[:, None] - flat[None]) ** 2).sum(-1).min(1)
  assert d.max() < 1e-8
  capsys.readouterr()
  stages.build_bank(bb, wd, progress=False)
  assert 'up to date' in capsys.readouterr().out
  before = os.stat(os.path.join(wd, 'bank', 'manifest.json')).st_mtime_ns
  m8 = stages.build_bank(bb, wd, force=True, batch_size=8, progress=False)
  assert os.stat(os.path.join(wd, 'bank', 'manifest.json')).st_mtime_ns != before
  # The contract: on one machine the read batch changes memory, not bits (same sha256 per file).
  assert m8['files'] == m['files'] and m8['meta']['compute_batch'] == c.bank.compute_batch


def test_bank_of_another_config_is_refused(tmp_path_factory):
  c, wd, _ = backbone_workdir(tmp_path_factory)
  if not os.path.exists(os.path.join(wd, 'bank', 'manifest.json')):
    stages.build_bank(registry.get(c), wd, progress=False)
  with pytest.raises(PipelineError, match='backbone_step'):
    _load_bank(c, wd, backbone_step=99)


def test_bank_on_another_cpu_isa_agrees_within_tolerance(tmp_path_factory, tmp_path):
  """Across CPUs bit-identity is not promised (XLA:CPU picks other kernels per ISA): the same
  build under another instruction set gives the same classes and rows, keys and values within
  float32 rounding. The other 'CPU' is this one with XLA capped to another ISA."""
  import subprocess
  import sys
  c, wd, _ = backbone_workdir(tmp_path_factory)
  here = str(tmp_path / 'here')
  shutil.copytree(os.path.join(wd, 'checkpoints'), os.path.join(here, 'checkpoints'))
  stages.build_bank(registry.get(c), here, progress=False)
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'xla_cpu_max_isa' not in f]
  isa = 'SSE4_2' if 'xla_cpu_max_isa=AVX2' in os.environ.get('XLA_FLAGS', '') else 'AVX2'
  other = str(tmp_path / 'other')
  shutil.copytree(os.path.join(wd, 'checkpoints'), os.path.join(other, 'checkpoints'))
  code = ('import sys; from tests.conftest import tiny_config; from fiancee_jax import '
          'registry; from fiancee_jax.core import stages; stages.build_bank(registry.get('
          'tiny_config(sys.argv[1])), sys.argv[2], progress=False)')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': ' '.join(flags + [f'--xla_cpu_max_isa={isa}'])}
  subprocess.run([sys.executable, '-c', code, c.data.data_dir, other], check=True, env=env,
                 cwd=str(REPO),
                 stdout=subprocess.DEVNULL, timeout=300)
  a, b = _load_bank(c, here), _load_bank(c, other)
  np.testing.assert_array_equal(np.asarray(a.key_classes), np.asarray(b.key_classes))
  np.testing.assert_allclose(np.asarray(a.keys), np.asarray(b.keys), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(a.values), np.asarray(b.values), rtol=1e-4, atol=1e-5)


def test_loaded_bank_searches_with_the_configs_index(tmp_path_factory):
  """bank.index / bank.faiss_threads reach every stage's bank (core.stages.load_bank_at)."""
  c, wd, _ = backbone_workdir(tmp_path_factory)
  if not os.path.exists(os.path.join(wd, 'bank', 'manifest.json')):
    stages.build_bank(registry.get(c), wd, progress=False)
  assert _load_bank(c, wd).host.index.kind == 'flat'
  c = c.copy_and_resolve_references()
  c.bank.index, c.bank.faiss_threads, c.bank.ivf_nlist = 'ivf', 1, 2
  b = _load_bank(c, wd)
  assert b.host.index.kind == 'ivf' and b.host.index.faiss_threads == 1
  assert b.ivf is not None

"""Test session set-up: 4 fake CPU devices (data-parallel tests) before jax is imported."""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  _flags += ' --xla_force_host_platform_device_count=4'
# Tests run tiny shapes, so XLA's LLVM optimisation time dominates: level 0 compiles the
# tiny models 2-3x faster (measured on tests/test_branches.py) with the same numerics.
if '--xla_backend_optimization_level' not in _flags:
  _flags += ' --xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = _flags.strip()

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def repo() -> pathlib.Path:
  return REPO


# ------------------------------------------------------------------ shared tiny experiments

_WORKDIRS = {}


def tiny_config(data_dir=None):
  """The tiny OASIS config (configs/oasis_synthetic.py:tiny), a fresh copy per call."""
  from fiancee_jax import config as cfg
  c = cfg.load(str(REPO / 'configs' / 'oasis_synthetic.py'), 'tiny')
  if data_dir is not None:
    c.data.data_dir = str(data_dir)
  return c


def heads_config(data_dir=None):
  """The tiny head-avatar config, 5 identities (train 0-2, validation 3, test 4; 4 frames each)."""
  from fiancee_jax import config as cfg
  c = cfg.load(str(REPO / 'configs' / 'megaportraits_synthetic.py'), 'tiny')
  c.data.num_identities = 5
  c.branches.batch_size = 4      # divides by the 4 test devices, <= 12 train pairs
  c.disc.ch = 8                  # a small patch discriminator (the tiny config keeps 64)
  if data_dir is not None:
    c.data.data_dir = str(data_dir)
  return c


def _saved_backbone(tmp_path_factory, name, config_fn):
  """(config, workdir, GAN state): a random-init backbone saved as the backbone stage saves it
  ({'train': GANState, 'ema_bn': collections} at step 1), shared by the tests of a session."""
  if name not in _WORKDIRS:
    from fiancee_jax import registry
    from fiancee_jax.train import checkpoint, gan
    root = tmp_path_factory.mktemp(name)
    c = config_fn(root / 'data')
    st = gan.create_train_state(registry.get(c))
    wd = str(root / 'wd')
    ck = checkpoint.Checkpointer(wd, 'backbone', c)
    ck.save(1, {'train': st, 'ema_bn': st.ema_state_g})
    ck.close()
    _WORKDIRS[name] = (c, wd, st)
  return _WORKDIRS[name]


def backbone_workdir(tmp_path_factory):
  """The tiny OASIS experiment with a random-init backbone stage (see `_saved_backbone`)."""
  return _saved_backbone(tmp_path_factory, 'fiancee', tiny_config)


def heads_workdir(tmp_path_factory):
  """The tiny head-avatar experiment with a random-init backbone stage."""
  return _saved_backbone(tmp_path_factory, 'heads', heads_config)


def heads_predictor_workdir(tmp_path_factory, wd: str):
  """(config, adapter, wd): the shared random head backbone copied into `wd`, its frame banks,
  and freshly initialised branches (exits 4, 6) saved as the branches stage saves them: what
  the predictor stage needs (trained-or-not exits); few predictor rows, as LPIPS (VGG16, 3
  images a row) dominates the time on CPU."""
  import copy
  import shutil
  from fiancee_jax import registry
  from fiancee_jax import workdir as wdir
  from fiancee_jax.core import stages
  from fiancee_jax.train import branches as tb
  from fiancee_jax.train import checkpoint
  c0, wd0, _ = heads_workdir(tmp_path_factory)
  c = copy.deepcopy(c0)
  c.branches.exits = (4, 6)
  c.predictor.num_train, c.predictor.num_test, c.predictor.num_noises = 4, 2, 2
  c.predictor.batch_size = 4
  bb = registry.get(c)
  shutil.copytree(wdir.checkpoint_dir(wd0, 'backbone'), wdir.checkpoint_dir(wd, 'backbone'))
  stages.build_bank(bb, wd, progress=False)
  models = tb.build_models(bb, axis_name=None)
  host = tb.create_train_state(bb, models, tb.load_backbone_discriminator(bb, wd))
  ck = checkpoint.Checkpointer(wd, 'branches', c)
  ck.save(0, tb.saved(host))  # the branches stage's payload
  ck.close()
  return c, bb, wd


def pytest_configure(config):
  """One XLA compilation cache for the whole run: the tiny train steps compiled by several test
  modules (backbone, branches, pipeline fixtures) are compiled once. A fresh directory per run,
  so nothing from an earlier run is reused; under pytest-xdist the workers of one run share it
  (PYTEST_XDIST_TESTRUNUID), and a size bound turns on jax's file lock around its reads and
  writes, so one worker never reads an entry the other is still writing."""
  import glob
  import shutil
  import tempfile
  import time

  import jax
  config.addinivalue_line('markers', 'slow: an end-to-end module (make test-slow)')
  for old in glob.glob(os.path.join(tempfile.gettempdir(), 'fiancee_xla_cache_*')):
    if time.time() - os.path.getmtime(old) > 24 * 3600:  # earlier runs' caches, a day on
      shutil.rmtree(old, ignore_errors=True)
  run = os.environ.get('PYTEST_XDIST_TESTRUNUID')
  if run:
    cache = os.path.join(tempfile.gettempdir(), f'fiancee_xla_cache_{run}')
    os.makedirs(cache, exist_ok=True)
  else:
    cache = tempfile.mkdtemp(prefix='fiancee_xla_cache_')
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_compilation_cache_max_size', 8 << 30)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


# Modules that take longest (seconds of `--durations=0` under 2 workers, AVX2, this machine),
# scheduled first so no worker is left with a long module at the end (longest first).
_SLOW_FIRST = ('test_multihost', 'test_adapter', 'test_branches_oasis', 'test_parallel',
               'test_sweep_heads', 'test_kill_safety', 'test_flops', 'test_branches',
               'test_model', 'test_gan_megaportraits', 'test_gan_oasis', 'test_lpips',
               'test_video_frames_pipeline', 'test_train_parity', 'test_stages')


# The end-to-end modules: multi-process runs, whole stages on tiny trained workdirs, PyTorch
# parity of the training step. Marked `slow`: `make test` runs the rest (the 10-minute tier),
# `make test-slow` these, and `.ci/run` both.
SLOW_MODULES = ('test_multihost', 'test_adapter', 'test_branches_oasis', 'test_parallel',
                'test_sweep_heads', 'test_kill_safety', 'test_video_frames_pipeline',
                'test_branches_heads', 'test_branches_init', 'test_gan_megaportraits',
                'test_entry_errors', 'test_generic_core', 'test_batch_cli', 'test_train_parity')


def _module_name(item) -> str:
  return item.module.__name__.rsplit('.', 1)[-1]


def pytest_collection_modifyitems(session, config, items):
  for item in items:
    if _module_name(item) in SLOW_MODULES:
      item.add_marker(pytest.mark.slow)
  rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(_module_name(item), len(rank)))

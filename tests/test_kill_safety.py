"""Kill-safe stages: `kill -9` (SIGKILL: no handler runs) of a real subprocess at chosen moments
of an orbax checkpoint save, a bank build (build_bank.py), a dataset prepare, a predictor row
cache write and a report write; then the rerun of the same call, and what it loads.

Kill points are filesystem markers the test polls for (a temporary folder appears, a file in it
reaches N bytes, a figure is rewritten), not sleeps: the kill lands inside the operation. Every
case checks that the rerun resumes from the last finished checkpoint or rebuilds what was half
written (saying so in one line), and that nothing half written is ever loaded.

The whole predictor stage and the sweep need every trained stage (minutes of compiling): their
writers are killed here (the predictor's row cache `train/predictor._save_npz`, the sweep's
`report.write`), and the readers the stages use (`predictor.dataset`, summary.json) are checked.
"""
import glob
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from fiancee_jax.core import bank as bank_lib
from fiancee_jax import data, registry
from fiancee_jax import workdir as wdir
from fiancee_jax.backbones.oasis import bank_inputs
from fiancee_jax.core import predictor_data as pdata
from fiancee_jax.core import stages
from fiancee_jax.infer import report
from fiancee_jax.data import builders
from fiancee_jax.train import checkpoint
from tests.conftest import REPO, backbone_workdir, tiny_config
from tests.infer.test_report import _result



def _env() -> dict:
  """The test session's environment for a child: CPU, the same XLA flags (conftest.py) and
  the session's compilation cache (a child compiles what the session compiled once)."""
  import jax
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get('PYTHONPATH')) if p))
  cache = jax.config.jax_compilation_cache_dir
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='1')
  return env


def _kill_at(args, reached, what: str, log: str, timeout: float = 180.0) -> None:
  """Run `python args...`, poll `reached()` until it holds, then SIGKILL the process."""
  with open(log, 'w') as out:
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(), stdout=out,
                            stderr=subprocess.STDOUT)
  t0 = time.monotonic()
  try:
    while not reached():
      if proc.poll() is not None:
        pytest.fail(f'the process ended (exit {proc.returncode}) before the kill point '
                    f'"{what}":\n{open(log).read()[-3000:]}')
      if time.monotonic() - t0 > timeout:
        pytest.fail(f'kill point "{what}" not reached in {timeout} s:\n{open(log).read()[-3000:]}')
      time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL, (what, proc.returncode)


def _size(path: str) -> int:
  """Bytes of the files under `path` (a folder another process is writing)."""
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      try:
        total += os.path.getsize(os.path.join(root, f))
      except OSError:  # renamed or removed meanwhile
        pass
  return total


# --------------------------------------------------------------------------- orbax save

_SAVE = """
import sys
import numpy as np
from fiancee_jax.train import checkpoint
ck = checkpoint.Checkpointer(sys.argv[1], 'backbone', None, keep=3)
for step in (1, 2):
  w = np.random.default_rng(step).random(int(sys.argv[2]), np.float32)
  ck.save(step, {'w': w, 'step': np.full((), step, np.int32)})
  ck.wait()
ck.close()
"""
_N = 16 << 20  # 64 MB of float32 per save: the save runs long enough to be killed inside it


def _state(step: int) -> dict:
  return {'w': np.random.default_rng(step).random(_N, np.float32),
          'step': np.full((), step, np.int32)}


@pytest.mark.parametrize('point', ['tmp_folder', 'state_16MB'])
def test_orbax_save_killed_resumes_last_finished_step(tmp_path, capsys, point):
  wd = str(tmp_path / 'wd')
  d = wdir.checkpoint_dir(wd, 'backbone')
  tmp2 = lambda: glob.glob(os.path.join(d, '2.orbax-checkpoint-tmp*'))  # noqa: E731
  reached = {'tmp_folder': lambda: bool(tmp2()),
             'state_16MB': lambda: bool(tmp2()) and _size(tmp2()[0]) >= 16 << 20}[point]
  _kill_at(['-c', _SAVE, wd, str(_N)], reached, f'save of step 2: {point}',
           str(tmp_path / 'log'))
  assert tmp2() and not os.path.exists(os.path.join(d, '2'))  # killed inside the save
  template = {'w': np.zeros(_N, np.float32), 'step': np.zeros((), np.int32)}
  # A reader (later stages: read-only) never sees the unfinished step ...
  state, meta = checkpoint.restore_latest(wd, 'backbone', template)
  assert meta['step'] == 1 and tmp2()
  # ... and the rerun's writer removes it (one line) and resumes from step 1.
  capsys.readouterr()
  ck = checkpoint.Checkpointer(wd, 'backbone', None, keep=3)
  out = capsys.readouterr().out
  assert 'removed 2.orbax-checkpoint-tmp' in out and len(out.strip().splitlines()) == 1
  assert not tmp2() and ck.latest_step() == 1
  state, meta = ck.restore(template)
  want = _state(1)
  np.testing.assert_allclose(state['w'], want['w'], rtol=1e-6, atol=0)
  assert int(state['step']) == 1 and meta['step'] == 1
  want = _state(2)
  ck.save(2, want)  # the rerun goes on
  ck.close()
  assert checkpoint.finished_steps(wd, 'backbone') == [1, 2]
  state, _ = checkpoint.restore_latest(wd, 'backbone', template)
  np.testing.assert_allclose(state['w'], want['w'], rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- bank build

_NOISES = 24  # 16 maps x 24 noises = 384 inputs: 48 backbone calls to be killed among


@pytest.fixture(scope='module')
def bank_setup(tmp_path_factory):
  """(config, workdir): the session's random-init backbone checkpoint, copied; the data
  prepared once (the build's children only read it)."""
  c, wd0, _ = backbone_workdir(tmp_path_factory)
  data.prepare(c.data, c.data.data_dir)
  c = tiny_config(c.data.data_dir)
  c.bank.num_maps, c.bank.num_noises = 16, _NOISES
  wd = str(tmp_path_factory.mktemp('kill_bank') / 'wd')
  shutil.copytree(os.path.join(wd0, 'checkpoints', 'backbone'),
                  wdir.checkpoint_dir(wd, 'backbone'))
  return c, wd


def _bank_cmd(c, wd, *extra):
  return ['build_bank.py', '--config=configs/oasis_synthetic.py:tiny',
          f'--config.data.data_dir={c.data.data_dir}', '--config.bank.num_maps=16',
          f'--config.bank.num_noises={_NOISES}', f'--workdir={wd}', '--verbosity=-1', *extra]


def test_bank_build_killed_keeps_or_rebuilds(bank_setup, tmp_path, capsys):
  c, wd = bank_setup
  path = wdir.bank_dir(wd)
  bb = registry.get(c)
  temps = lambda: glob.glob(os.path.join(wd, '.bank.tmp-*'))  # noqa: E731
  # 1. First build, killed once its temporary folder exists (no bank yet).
  _kill_at(_bank_cmd(c, wd), lambda: bool(temps()), 'bank build: temporary folder',
           str(tmp_path / 'log1'))
  assert temps() and not os.path.exists(path)
  capsys.readouterr()
  m1 = stages.build_bank(bb, wd, progress=False)  # the rerun: builds, removes the leftover
  out = capsys.readouterr().out
  assert '.bank.tmp-' in out and 'killed' in out, out
  assert not temps()
  b1 = bank_lib.load(path, verify=True)  # every file's sha256
  assert m1['num_inputs'] == 16 * _NOISES
  # 2. Forced rebuild over that bank, killed mid-stream (per-class pools on disk).
  pools = lambda: glob.glob(os.path.join(wd, '.bank.tmp-*', '_pools', 'k*.npy'))  # noqa: E731
  _kill_at(_bank_cmd(c, wd, '--force'), lambda: bool(pools()), 'bank build: pools written',
           str(tmp_path / 'log2'))
  assert temps()
  old = bank_lib.load(path, verify=True)  # the old bank survives, whole
  assert old.manifest['files'] == m1['files']
  assert bank_inputs.existing_bank_ok(c, bb.bank_shapes(), wd, m1['backbone_step']) is None
  capsys.readouterr()
  m2 = stages.build_bank(bb, wd, force=True, progress=False)  # the same command again
  out = capsys.readouterr().out
  assert '.bank.tmp-' in out and 'killed' in out, out
  assert not temps() and not glob.glob(os.path.join(wd, '.bank.*'))
  b2 = bank_lib.load(path, verify=True)
  assert m2['count'] == m1['count']
  np.testing.assert_allclose(np.asarray(b2.keys), np.asarray(b1.keys), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- dataset prepare

_PREPARE = """
import sys
from fiancee_jax import data
from tests.conftest import tiny_config
c = tiny_config(sys.argv[1])
c.data.num_train = int(sys.argv[2])
data.prepare(c.data, sys.argv[1])
"""


def test_prepare_killed_is_rebuilt_whole(tmp_path, capsys):
  n = 120
  c = tiny_config(str(tmp_path / 'data'))
  c.data.num_train = n
  b = builders.make_builder(c.data, c.data.data_dir)
  version = str(b.data_path)
  incomplete = lambda: glob.glob(os.path.join(os.path.dirname(version), 'incomplete.*'))  # noqa
  train_written = lambda: any(  # noqa: E731  train split on disk, validation being generated
      os.path.getsize(f) > 0 for d in incomplete() for f in glob.glob(f'{d}/*-train.*'))
  for point, reached in (('incomplete folder', lambda: bool(incomplete())),
                         ('train split written', train_written)):
    _kill_at(['-c', _PREPARE, c.data.data_dir, str(n)], reached, f'prepare: {point}',
             str(tmp_path / 'log'))
    assert incomplete() and not os.path.exists(version), point  # nothing under the version
    capsys.readouterr()
    data.prepare(c.data, c.data.data_dir)  # the rerun
    out = capsys.readouterr().out
    assert 'prepare killed before it finished' in out, out
    assert not incomplete() and builders.missing(b) is None
    sizes = {s: len(data.source(c.data, s, c.data.data_dir, prepare_if_missing=False))
             for s in ('train', 'validation', 'test')}
    assert sizes == {'train': n, 'validation': 8, 'test': 8}, point
    last = data.source(c.data, 'train', c.data.data_dir)[n - 1]
    assert last['label'].shape == (c.data.height, c.data.width) and int(last['index']) == n - 1
    shutil.rmtree(version)  # the next kill point prepares from scratch again


def test_prepare_rebuilds_a_version_folder_without_dataset_info(tmp_path, capsys):
  """What tfds alone reuses as done (a version folder lacking dataset_info.json, e.g. from an
  interrupted copy) is rebuilt, with one line."""
  c = tiny_config(str(tmp_path / 'data'))
  path = data.prepare(c.data, c.data.data_dir)
  os.remove(path / 'dataset_info.json')
  capsys.readouterr()
  data.prepare(c.data, c.data.data_dir)
  assert 'has no dataset_info.json' in capsys.readouterr().out
  assert len(data.source(c.data, 'test', c.data.data_dir, prepare_if_missing=False)) == 8


# --------------------------------------------------------------------------- predictor cache

_ROWS = """
import sys
import numpy as np
from fiancee_jax.core import predictor_data as pdata
path, n, fp = sys.argv[1], int(sys.argv[2]), sys.argv[3]
pdata.save_npz(path, {'feats': np.ones((n,), np.float32), 'fingerprint': np.array(fp)})
"""


def test_predictor_cache_write_killed_loads_the_whole_one(tmp_path, capsys):
  c = tiny_config(str(tmp_path / 'data'))
  wd = str(tmp_path / 'wd')
  bb = registry.get(c)
  rs = bb.predictor_rows().rows(wd, 'test')
  maps, z = rs.index['maps'], rs.index['z']
  fp = pdata.fingerprint(c, wd, 'test', *rs.index.values())
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(len(maps), 3, 4, 8)).astype(np.float32)
  targets = rng.uniform(size=(len(maps), 4)).astype(np.float32)
  path = os.path.join(wdir.predictor_dir(wd), 'dataset_test.npz')
  pdata.save_npz(path, {'feats': feats, 'targets': targets, 'maps': maps.astype(np.int32),
                      'z': z.astype(np.float32), 'fingerprint': np.array(fp)})
  temps = lambda: glob.glob(os.path.join(wdir.predictor_dir(wd), '.dataset_test.npz.tmp-*'))  # noqa
  for point, nbytes in (('first bytes written', 0), ('32 MB written', 32 << 20)):
    _kill_at(['-c', _ROWS, path, str(32 << 20), fp],  # 128 MB of rows
             lambda: any(os.path.getsize(f) > nbytes for f in temps()),
             f'row cache write: {point}', str(tmp_path / 'log'))
    assert temps(), point
    # The stage's reader (train.py --stage=predictor, infer.py --sweep) takes the whole cache;
    # without a pipeline it could not rebuild, so it has loaded, not recomputed.
    rows = pdata.dataset(bb, wd, 'test')
    np.testing.assert_allclose(rows['feats'], feats, rtol=1e-6)
    np.testing.assert_allclose(rows['targets'], targets, rtol=1e-6)
  capsys.readouterr()
  pdata.save_npz(path, {'feats': feats + 1, 'targets': targets, 'maps': maps.astype(np.int32),
                      'z': z.astype(np.float32), 'fingerprint': np.array(fp)})
  assert 'killed' in capsys.readouterr().out and not temps()  # the next write tidies up
  np.testing.assert_allclose(pdata.dataset(bb, wd, 'test')['feats'], feats + 1, rtol=1e-6)


# --------------------------------------------------------------------------- report write

_REPORT = """
import pickle
import sys
from fiancee_jax.infer import report
with open(sys.argv[2], 'rb') as f:
  report.write(sys.argv[1], pickle.load(f))
"""


def _check_whole(out_dir: str) -> list[str]:
  """Every file present in the report folder parses / decodes in full; returns the names."""
  names = sorted(os.listdir(out_dir))
  for name in names:
    p = os.path.join(out_dir, name)
    if name.endswith('.png'):
      with Image.open(p) as im:
        im.load()
    elif name.endswith('.json'):
      json.load(open(p))
  return names


def test_report_write_killed_never_leaves_a_summary_of_a_partial_report(tmp_path):
  out_dir = str(tmp_path / 'report')
  res = str(tmp_path / 'result.pkl')  # the sweep's result (synthetic numbers, test_report.py)
  with open(res, 'wb') as f:
    pickle.dump(_result(), f)
  figs = report.figures('oasis')
  fig = lambda name: os.path.join(out_dir, name)  # noqa: E731
  # 1. First write, killed after its first figure: no summary.json (the completion mark).
  _kill_at(['-c', _REPORT, out_dir, res], lambda: os.path.exists(fig(figs[0])),
           'report: first figure', str(tmp_path / 'log1'))
  names = _check_whole(out_dir)
  assert 'summary.json' not in names and 'report.md' not in names, names
  paths = report.write(out_dir, _result())  # the rerun
  assert set(_check_whole(out_dir)) == {*figs, 'report.md', 'summary.json', 'sweep.json'}
  # 2. A re-sweep over that complete report, killed after some figures were rewritten.
  t_old = os.stat(fig(figs[1])).st_mtime_ns
  _kill_at(['-c', _REPORT, out_dir, res], lambda: os.stat(fig(figs[1])).st_mtime_ns != t_old,
           'report: two figures rewritten', str(tmp_path / 'log2'))
  names = _check_whole(out_dir)
  assert 'summary.json' not in names, names  # `make demo` sees no finished report: reruns
  report.write(out_dir, _result())
  assert set(_check_whole(out_dir)) == {*figs, 'report.md', 'summary.json', 'sweep.json'}
  summary = json.load(open(paths['summary']))
  assert summary['gmacs_share'] == 0.5
  md = open(paths['report']).read()
  assert all(f'({name})' in md for name in figs)

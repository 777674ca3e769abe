"""Several processes for real: two JAX processes on this machine (2 CPU devices each, gloo
collectives over localhost, started by `python -m fiancee_jax.launch`) behave like two hosts.

One launch trains the tiny backbone with process 1 receiving SIGTERM after step 1: both
processes must stop at step 1 with one checkpoint, equal (within float tolerance) to step 1 of
one process with 4 devices on the same global batch; the same processes then resume for one
more step, equal to one step of that one process resumed from the two processes' checkpoint.
A wrong reduction (one model per host, a halved or duplicated global batch) moves the weights
by O(1e-2); the tolerance is 1e-4 (under AVX2-only kernels one kernel element of 36864 was
2.3e-5 off after a step, over the earlier 2e-5). Each comparison is one step from the same state: Adam's first updates are about
lr * sign(gradient), so where a gradient is near zero the summation order of the reduction
(gloo across processes vs XLA's within one) flips the sign, and after two steps one process
with 2 devices and one with 4 devices already differ by ~1e-3 (measured). The same launch
checks both `parallel` modes on a toy step (global mean over all 4 devices). A second launch
runs the FIANCEE stages (guided branches, predictor: one step each) on the two processes'
backbone and a bank, against one process with 4 devices from the same workdir (gradients,
loader position, the predictor's rows). Also: the environment checks of
`parallel.distributed_settings`, a bad environment through train.py (one line), the launcher's
prefixes and exit status.

Run as a script (`tests/train/test_multihost.py <out> <data_dir> <workdir>`), this file is the worker
of the launch.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_STEPS, STOP_AT = 2, 1


def _config(data_dir, num_steps=NUM_STEPS):
  from fiancee_jax import config as cfg
  c = cfg.load(os.path.join(REPO, 'configs', 'oasis_synthetic.py'), 'tiny')
  c.train.num_steps = num_steps
  c.data.data_dir = str(data_dir)
  return c


# ------------------------------------------------------------------------------ the worker

def _toy_step(state, batch, axis_name):
  from jax import lax
  g = lax.pmean(batch['x'].mean(), axis_name)
  return {'w': state['w'] + g}, {'g': g}


def worker(out: str, data_dir: str, workdir: str) -> None:
  from fiancee_jax.train import parallel
  assert parallel.initialize()
  import jax
  pid = jax.process_index()
  result = {'process_count': jax.process_count(), 'device_count': jax.device_count()}
  # Both modes on a toy step: every process feeds its rows of the global batch (0..7).
  rows = np.arange(8, dtype=np.float32).reshape(4, 2)[2 * pid:2 * pid + 2]
  for mode in parallel.MODES:
    dp = parallel.wrap(_toy_step, mode)
    state, metrics = dp(dp.put_state({'w': np.zeros((), np.float32)}), dp.put_batch({'x': rows}))
    result[mode] = [float(dp.get_state(state)['w']), float(metrics['g']), dp.num_devices]

  from fiancee_jax import registry
  from fiancee_jax.train import gan

  def sigterm(step, state, metrics):  # noqa: ARG001 - the real signal, to process 1 only
    if pid == 1 and step == STOP_AT:
      os.kill(os.getpid(), signal.SIGTERM)

  stopped = gan.train_and_evaluate(registry.get(_config(data_dir)), workdir, hooks=[sigterm])
  result['stopped_at'] = int(stopped.step)
  result['resumed_to'] = int(gan.train_and_evaluate(registry.get(_config(data_dir)), workdir).step)
  with open(os.path.join(out, f'p{pid}.json'), 'w') as f:
    json.dump(result, f)


def _fiancee_config(data_dir):
  """One step of each FIANCEE training stage: the guided branches (the step distils: L1 +
  LPIPS vs the backbone, the bank's guide) and the predictor on them. One step each (the module
  docstring: Adam and summation order). The unguided branches and Eq. S1's adversarial step
  are the same stage code with other losses; their compile on two processes took minutes, so
  they are not run here."""
  c = _config(data_dir)
  c.branches.num_steps = c.predictor.num_steps = 1
  return c


def train_fiancee(workdir: str, data_dir: str) -> None:
  """The FIANCEE stages on a workdir holding the backbone and the bank (any process count)."""
  from fiancee_jax import registry
  from fiancee_jax.train import branches
  from fiancee_jax.train import predictor as tp
  bb = registry.get(_fiancee_config(data_dir))
  branches.train_and_evaluate(bb, workdir)
  tp.train_and_evaluate(bb, workdir)


def fiancee_worker(out: str, data_dir: str, workdir: str) -> None:
  from fiancee_jax.train import parallel
  assert parallel.initialize()
  import jax
  train_fiancee(workdir, data_dir)
  with open(os.path.join(out, f'fiancee_p{jax.process_index()}.json'), 'w') as f:
    json.dump({'process_count': jax.process_count()}, f)


# ------------------------------------------------------------------------------ the tests

def _env(cache_dir):
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_backend_optimization_level=0'   # the launcher adds the devices
  # The compilation cache serves process 0 only: jax writes entries from process 0 alone,
  # and on CPU its keys differ between processes (so jax_share_binary_between_hosts would
  # leave process 1 waiting for a key process 0 never writes).
  env.update(JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='1')
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(k, None)
  return env


def _saved(workdir, step, stage='backbone'):
  import orbax.checkpoint as ocp
  from fiancee_jax.train import checkpoint
  ckpt = checkpoint.Checkpointer(workdir, stage, read_only=True)
  try:
    out = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    return out['state'], dict(out['meta'])
  finally:
    ckpt.close()


def _assert_trees_close(a, b, what):
  """Every float leaf of a and b within the tolerance; integer leaves (step counters, key
  data: orbax restores them as plain arrays) equal."""
  import jax
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > 0, what
  for (path, x), y in zip(la, lb):
    if not np.issubdtype(np.asarray(x).dtype, np.floating):
      assert np.array_equal(np.asarray(x), np.asarray(y)), f'{what}{jax.tree_util.keystr(path)}'
      continue
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=1e-4, atol=1e-4, err_msg=f'{what}{jax.tree_util.keystr(path)}')


def _launch(args, env):
  """`python -m fiancee_jax.launch -n 2 -- this file ARGS` started; returns the Popen."""
  return subprocess.Popen(
      [sys.executable, '-m', 'fiancee_jax.launch', '-n', '2', '--', os.path.abspath(__file__),
       *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      start_new_session=True)


def _finish(launch, what, log_path, timeout=400):
  try:
    log, _ = launch.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(launch.pid, signal.SIGKILL)
    log, _ = launch.communicate()
    pytest.fail(f'{what} did not finish in {timeout} s:\n' + log.decode()[-4000:])
  text = log.decode()
  log_path.write_text(text)
  assert launch.returncode == 0, f'{log_path}:\n{text[-6000:]}'
  return text


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(worker results, two-process workdir, reference workdirs, launch log, launch wall time).
  References: 'ref' = one process with 4 devices from scratch to step 1; 'ref_resumed' = one
  process resumed from the two processes' step-1 checkpoint to step 2."""
  import shutil

  import jax
  from fiancee_jax import data
  from fiancee_jax import registry
  from fiancee_jax import workdir as wdir
  from fiancee_jax.train import gan
  root = tmp_path_factory.mktemp('multihost')
  data_dir, out, mh = root / 'data', root / 'out', str(root / 'mh')
  out.mkdir()
  data.prepare(_config(data_dir).data, str(data_dir))
  t0 = time.perf_counter()
  launch = _launch([str(out), str(data_dir), mh], _env(str(root / 'xla_cache')))
  # Meanwhile the reference: one process, 4 devices, the same global batch.
  assert jax.device_count() == 4
  gan.train_and_evaluate(registry.get(_config(data_dir, STOP_AT)), str(root / 'ref'))
  text = _finish(launch, 'two-process run', root / 'launch.log', timeout=300)
  wall = time.perf_counter() - t0
  results = [json.load(open(out / f'p{i}.json')) for i in range(2)]
  # One process resumed from the two processes' stop checkpoint, one step.
  src = os.path.join(wdir.checkpoint_dir(mh, 'backbone'), str(STOP_AT))
  resumed = str(root / 'ref_resumed')
  shutil.copytree(src, os.path.join(wdir.checkpoint_dir(resumed, 'backbone'),
                                    str(STOP_AT)))
  gan.train_and_evaluate(registry.get(_config(data_dir)), resumed)
  return results, mh, {STOP_AT: str(root / 'ref'), NUM_STEPS: resumed}, text, wall


@pytest.fixture(scope='module')
def fiancee_runs(runs, tmp_path_factory):
  """The FIANCEE stages (branches, predictor; `train_fiancee`) on two
  processes and on one process with 4 devices, from the same workdir: the two processes'
  backbone (step 2) and a bank built by one process (build_bank.py refuses several).
  Returns (two-process workdir, one-process workdir)."""
  import shutil

  from fiancee_jax import registry
  from fiancee_jax.core import stages
  mh = runs[1]
  data_dir = os.path.join(os.path.dirname(mh), 'data')
  root = tmp_path_factory.mktemp('multihost_fiancee')
  base, two, one, out = (str(root / n) for n in ('base', 'two', 'one', 'out'))
  os.makedirs(out)
  shutil.copytree(os.path.join(mh, 'checkpoints', 'backbone'),
                  os.path.join(base, 'checkpoints', 'backbone'))
  stages.build_bank(registry.get(_fiancee_config(data_dir)), base, progress=False)
  shutil.copytree(base, two)
  shutil.copytree(base, one)
  launch = _launch(['fiancee', out, data_dir, two], _env(str(root / 'xla_cache')))
  train_fiancee(one, data_dir)   # meanwhile: one process, 4 devices
  _finish(launch, 'two-process FIANCEE stages', root / 'launch.log')
  for i in range(2):
    assert json.load(open(os.path.join(out, f'fiancee_p{i}.json'))) == {'process_count': 2}
  return two, one


@pytest.mark.parametrize('stage', ['branches', 'predictor'])
def test_fiancee_stages_on_two_processes_equal_one_process(fiancee_runs, stage):
  """Step 1 of each stage, one process with 4 devices vs two with 2: the same loader
  position, the same gradient and the predictor's rows (computed once by process 0) equal.
  The gradient is read from Adam's first moment (mu = 0.1 g after one step), within 2% of each
  tensor's largest entry (+ 1e-4 of the largest in the state: pure float noise): a halved or
  duplicated global batch, or one model per process, gives another gradient (O(1) relative).
  The parameters after one Adam step move by lr * g / |g|, so an entry whose gradient is float
  noise (a bias before a normalisation: zero in exact arithmetic) may move by +-lr on one side
  and -+lr on the other: within 2.5 lr."""
  import jax
  two, one = fiancee_runs
  got, got_meta = _saved(two, 1, stage)
  want, want_meta = _saved(one, 1, stage)
  assert got_meta['data'] == want_meta['data']
  lr = float(_fiancee_config('')[stage].lr)
  la, lb = jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)
  assert len(la) == len(lb) > 0
  mus = [np.abs(np.asarray(y)).max() for (path, _), y in zip(la, lb)
         if "['mu']" in jax.tree_util.keystr(path) and np.size(y)]
  assert mus, 'no Adam first moments in the checkpoint'
  floor = 1e-4 * max(mus)   # gradients of float noise only (1e-9 beside 1e-2)
  for (path, x), y in zip(la, lb):
    key, x, y = jax.tree_util.keystr(path), np.asarray(x), np.asarray(y)
    if not np.issubdtype(x.dtype, np.floating):
      assert np.array_equal(x, y), key
    elif "['mu']" in key:
      np.testing.assert_allclose(x, y, rtol=0, atol=0.02 * np.abs(y).max() + floor, err_msg=key)
    elif "opt_state" not in key:
      np.testing.assert_allclose(x, y, rtol=0, atol=2.5 * lr + 1e-6, err_msg=key)
  if stage == 'predictor':
    for split in ('train', 'calibration'):
      a = np.load(os.path.join(two, 'predictor', f'dataset_{split}.npz'))
      b = np.load(os.path.join(one, 'predictor', f'dataset_{split}.npz'))
      np.testing.assert_array_equal(a['maps'], b['maps'])
      np.testing.assert_array_equal(a['z'], b['z'])
      # The launch runs XLA at optimisation level 0, this process at the default: the tiny
      # model's LPIPS (1e-5..1e-3) differ by ~0.4% of the largest; another row by O(1).
      np.testing.assert_allclose(a['targets'], b['targets'], rtol=0,
                                 atol=1e-2 * np.abs(b['targets']).max())


def test_both_parallel_modes_reduce_over_every_process(runs):
  results = runs[0]
  # Global batch rows 0..7 on 4 devices: the device means are 0.5, 2.5, 4.5, 6.5; their
  # mean is 3.5 on every process (one host alone would see 1.5 or 5.5).
  for r in results:
    assert (r['process_count'], r['device_count']) == (2, 4)
    for mode in ('shard_map', 'pmap'):
      np.testing.assert_allclose(r[mode][:2], [3.5, 3.5], rtol=1e-6, err_msg=mode)
      assert r[mode][2] == 4


def test_sigterm_to_one_process_stops_both_at_one_step(runs):
  results, mh, _, log, _ = runs
  assert [r['stopped_at'] for r in results] == [STOP_AT, STOP_AT]
  assert f'[p1] [backbone] stopped by signal {int(signal.SIGTERM)} after step {STOP_AT}' in log
  assert '[p0] [backbone] stopped with the other processes' in log
  # One consistent checkpoint at the stop step (the resume then wrote the last one).
  from fiancee_jax.train import checkpoint
  assert checkpoint.finished_steps(mh, 'backbone') == [STOP_AT, NUM_STEPS]


@pytest.mark.parametrize('step', [STOP_AT, NUM_STEPS])
def test_two_processes_equal_one_process_with_four_devices(runs, step):
  """Step 1: from scratch; step 2: the resume (state, rng and data position from the
  checkpoint), each against one process with 4 devices."""
  results, mh, refs, _, _ = runs
  assert [r['resumed_to'] for r in results] == [NUM_STEPS, NUM_STEPS]
  got, got_meta = _saved(mh, step)
  want, want_meta = _saved(refs[step], step)
  assert got_meta['step'] == want_meta['step'] == step
  assert got_meta['data'] == want_meta['data']   # each global batch loaded exactly once
  _assert_trees_close(got['train'], want['train'], f'step {step} train')
  _assert_trees_close(got['ema_bn'], want['ema_bn'], f'step {step} ema_bn')


def test_launch_wall_time(runs):
  print(f'two-process launch (2 x 2 CPU devices: stop after step {STOP_AT}, resume to '
        f'{NUM_STEPS}): {runs[4]:.1f} s')


# ---------------------------------------------------------------- settings, errors, launcher

def test_distributed_settings_from_the_environment():
  from fiancee_jax.train import parallel
  ok = {'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'JAX_NUM_PROCESSES': '4',
        'JAX_PROCESS_ID': '3'}
  assert parallel.distributed_settings({}) is None            # a plain machine: no init
  assert parallel.distributed_settings(ok) == {
      'coordinator_address': '10.0.0.1:1234', 'num_processes': 4, 'process_id': 3}
  slurm = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'n[1-2]', 'SLURM_NTASKS': '2',
           'SLURM_PROCID': '1', 'SLURM_LOCALID': '0'}
  assert parallel.distributed_settings(slurm) == {}           # jax reads the cluster itself
  assert parallel.distributed_settings({**slurm, 'SLURM_NTASKS': '1'}) is None
  assert parallel.distributed_settings({'OMPI_MCA_orte_hnp_uri': 'x', 'OMPI_COMM_WORLD_SIZE':
                                        '2'}) == {}
  bad = [({'JAX_PROCESS_ID': '0'}, 'JAX_PROCESS_ID is set but JAX_NUM_PROCESSES is not'),
         ({'JAX_NUM_PROCESSES': '2'}, 'JAX_NUM_PROCESSES is set but JAX_PROCESS_ID is not'),
         ({'JAX_COORDINATOR_ADDRESS': 'h:1'}, 'JAX_NUM_PROCESSES and JAX_PROCESS_ID are not'),
         ({**ok, 'JAX_COORDINATOR_ADDRESS': None}, 'JAX_COORDINATOR_ADDRESS is not'),
         ({**ok, 'JAX_PROCESS_ID': '4'}, '0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES'),
         ({**ok, 'JAX_NUM_PROCESSES': 'two'}, 'expected integers'),
         ({**ok, 'JAX_COORDINATOR_ADDRESS': 'localhost'}, 'expected host:port')]
  for env, message in bad:
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(parallel.DistributedError, match=message):
      parallel.distributed_settings(env)


def test_bad_environment_is_one_line_from_train_py(tmp_path):
  env = {**os.environ, 'JAX_PROCESS_ID': '1'}
  env.pop('JAX_NUM_PROCESSES', None)
  p = subprocess.run([sys.executable, 'train.py', '--config', 'configs/oasis_synthetic.py:tiny',
                      '--workdir', str(tmp_path / 'w')], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 1
  assert p.stderr.strip().splitlines() == [
      'train.py: JAX_PROCESS_ID is set but JAX_NUM_PROCESSES is not; expected all three of '
      'JAX_COORDINATOR_ADDRESS=host:port (process 0), JAX_NUM_PROCESSES=N, '
      'JAX_PROCESS_ID=0..N-1 on every process']
  assert not (tmp_path / 'w').exists()


def test_launcher_prefixes_lines_and_returns_the_first_failure():
  code = ('import os, sys; i = os.environ["JAX_PROCESS_ID"]; '
          'print("process", i, "of", os.environ["JAX_NUM_PROCESSES"], '
          'os.environ["JAX_COORDINATOR_ADDRESS"].startswith("127.0.0.1:"), '
          '"--xla_force_host_platform_device_count=3" in os.environ["XLA_FLAGS"]); '
          'sys.exit(3 * int(i))')
  p = subprocess.run([sys.executable, '-m', 'fiancee_jax.launch', '-n', '2',
                      '--devices_per_process', '3', '--', sys.executable, '-c', code],
                     cwd=REPO, capture_output=True, text=True, timeout=60)
  assert p.returncode == 3
  lines = p.stdout.splitlines()
  assert '[p0] process 0 of 2 True True' in lines and '[p1] process 1 of 2 True True' in lines
  assert '[launch] process 1 exited with status 3; stopping the others' in lines


if __name__ == '__main__':
  if sys.argv[1] == 'fiancee':
    fiancee_worker(*sys.argv[2:5])
  else:
    worker(*sys.argv[1:4])

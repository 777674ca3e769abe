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
checks both `parallel` modes on a toy step (global mean over all 4 devices). Also: the environment checks of
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


def _saved(workdir, step):
  import orbax.checkpoint as ocp
  from fiancee_jax.train import checkpoint
  ckpt = checkpoint.Checkpointer(workdir, 'backbone', read_only=True)
  try:
    out = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    return out['state'], dict(out['meta'])
  finally:
    ckpt.close()


def _assert_trees_close(a, b, what):
  import jax
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > 0, what
  for (path, x), y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=1e-4, atol=1e-4, err_msg=f'{what}{jax.tree_util.keystr(path)}')


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
  launch = subprocess.Popen(
      [sys.executable, '-m', 'fiancee_jax.launch', '-n', '2', '--', os.path.abspath(__file__),
       str(out), str(data_dir), mh],
      cwd=REPO, env=_env(str(root / 'xla_cache')), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, start_new_session=True)
  # Meanwhile the reference: one process, 4 devices, the same global batch.
  assert jax.device_count() == 4
  gan.train_and_evaluate(registry.get(_config(data_dir, STOP_AT)), str(root / 'ref'))
  try:
    log, _ = launch.communicate(timeout=300)
  except subprocess.TimeoutExpired:
    os.killpg(launch.pid, signal.SIGKILL)
    log, _ = launch.communicate()
    pytest.fail('two-process run did not finish in 300 s:\n' + log.decode()[-4000:])
  wall = time.perf_counter() - t0
  text = log.decode()
  (root / 'launch.log').write_text(text)
  assert launch.returncode == 0, f'{root / "launch.log"}:\n{text[-6000:]}'
  results = [json.load(open(out / f'p{i}.json')) for i in range(2)]
  # One process resumed from the two processes' stop checkpoint, one step.
  src = os.path.join(wdir.checkpoint_dir(mh, 'backbone'), str(STOP_AT))
  resumed = str(root / 'ref_resumed')
  shutil.copytree(src, os.path.join(wdir.checkpoint_dir(resumed, 'backbone'),
                                    str(STOP_AT)))
  gan.train_and_evaluate(registry.get(_config(data_dir)), resumed)
  return results, mh, {STOP_AT: str(root / 'ref'), NUM_STEPS: resumed}, text, wall


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
  worker(*sys.argv[1:4])

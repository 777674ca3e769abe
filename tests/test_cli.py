"""fiancee_jax/cli.py: the persistent compilation cache every entry point sets up, and the
process start time infer.py's time to first image counts from (fresh interpreters: the test
session has its own cache set by tests/conftest.py)."""
import json
import os
import subprocess
import sys
import time

from fiancee_jax import cli
from tests.conftest import REPO

_PROBE = r'''
import json, sys
import jax, jax.numpy as jnp
from fiancee_jax import cli
workdir, must_exist = sys.argv[1], sys.argv[2] == '1'
used = cli.compilation_cache(workdir, must_exist=must_exist)
f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + jnp.tanh(x).sum())
f(jnp.ones((64, 64))).block_until_ready()
print(json.dumps({'used': used, 'dir': jax.config.jax_compilation_cache_dir}))
'''


def _probe(workdir, must_exist=True, env=None):
  e = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  e.update(env or {}, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  code = _PROBE.replace('used = cli', 'cli.CACHE_MIN_COMPILE_S = 0.0\nused = cli')
  r = subprocess.run([sys.executable, '-c', code, str(workdir), '1' if must_exist else '0'],
                     cwd=REPO, env=e, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_compilation_cache_in_the_workdir(tmp_path):
  wd = tmp_path / 'wd'
  assert _probe(wd) == {'used': None, 'dir': None}       # a missing workdir is not created
  assert not wd.exists()
  out = _probe(wd, must_exist=False)                     # train.py: the workdir may be new
  cache = wd / 'xla_cache'
  assert out == {'used': str(cache), 'dir': str(cache)}
  entries = [f for f in os.listdir(cache) if not f.startswith('.')]
  assert entries, 'nothing cached'
  assert _probe(wd)['used'] == str(cache)                # an existing workdir: its cache
  other = tmp_path / 'mine'
  out = _probe(wd, env={'JAX_COMPILATION_CACHE_DIR': str(other)})   # the user's is kept
  assert out == {'used': str(other), 'dir': str(other)}


def test_process_start_time():
  started = cli.process_start_time()
  assert 0 <= time.time() - started < 24 * 3600   # this process started before now

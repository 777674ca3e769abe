"""Start N JAX processes on this machine, as N hosts would run: try multi-host without a cluster.

  python -m fiancee_jax.launch -n 2 -- train.py --config configs/oasis_synthetic.py:tiny \
      --workdir /tmp/mh --config.train.num_steps=20

Each process gets the environment `fiancee_jax.train.parallel.initialize` reads
(JAX_COORDINATOR_ADDRESS = 127.0.0.1:<a free port>, JAX_NUM_PROCESSES = N, JAX_PROCESS_ID = i),
JAX_PLATFORMS=cpu (unless set) and `--xla_force_host_platform_device_count=<devices_per_process>`
in XLA_FLAGS: N x D CPU devices talking over localhost (gloo collectives), a real multi-process
run. A command that ends in .py runs with this Python. Every output line is prefixed with
`[p<i>]` (gloo's 'Rank k is connected to m peer ranks' lines are dropped). Ctrl-C / SIGTERM are
passed on to every process (they agree on the step to stop at and save one checkpoint). When a
process fails, the others are stopped (they could only wait for it); the exit status is the first
non-zero one, else 0.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

_DEVICE_COUNT = re.compile(r'--xla_force_host_platform_device_count=\S*')
_GLOO_NOISE = re.compile(rb'^\[Gloo\] Rank \d+ is connected to \d+ peer ranks')
GRACE_S = 10.0  # a failed process's peers: SIGTERM, then SIGKILL after this long


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], index: int, count: int, port: int,
                devices_per_process: int) -> dict[str, str]:
  """The environment of process `index` of `count`."""
  env = dict(base)
  flags = _DEVICE_COUNT.sub('', env.get('XLA_FLAGS', '')).strip()
  env['XLA_FLAGS'] = (f'{flags} --xla_force_host_platform_device_count={devices_per_process}'
                      ).strip()
  env.setdefault('JAX_PLATFORMS', 'cpu')
  env.update(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=str(count),
             JAX_PROCESS_ID=str(index), PYTHONUNBUFFERED='1')
  return env


def _pump(index: int, stream, out, lock: threading.Lock) -> None:
  prefix = f'[p{index}] '.encode()
  for line in iter(stream.readline, b''):
    if _GLOO_NOISE.match(line):
      continue
    with lock:
      out.write(prefix + (line if line.endswith(b'\n') else line + b'\n'))
      out.flush()
  stream.close()


def launch(command: Sequence[str], num_processes: int, devices_per_process: int = 2,
           port: int | None = None, out=None) -> int:
  """Run `command` as processes 0..num_processes-1; returns the exit status."""
  out = out if out is not None else sys.stdout.buffer
  cmd = list(command)
  if cmd[0].endswith('.py'):
    cmd = [sys.executable, *cmd]
  port = port or free_port()
  lock = threading.Lock()
  procs, pumps = [], []
  for i in range(num_processes):
    p = subprocess.Popen(cmd, env=process_env(dict(os.environ), i, num_processes, port,
                                              devices_per_process),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)  # signals reach them from here only
    procs.append(p)
    t = threading.Thread(target=_pump, args=(i, p.stdout, out, lock), daemon=True)
    t.start()
    pumps.append(t)

  def forward(signum, frame):  # noqa: ARG001
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)

  old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  status, failed_at = 0, None
  try:
    while True:
      running = [p.poll() is None for p in procs]
      for i, p in enumerate(procs):
        if not running[i] and p.returncode != 0 and status == 0:
          status, failed_at = p.returncode, time.monotonic()
          with lock:
            out.write(f'[launch] process {i} exited with status {p.returncode}; stopping the '
                      'others\n'.encode())
            out.flush()
          for q in procs:
            if q.poll() is None:
              q.send_signal(signal.SIGTERM)
      if not any(running):
        break
      if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
        for q in procs:
          if q.poll() is None:
            q.kill()
      time.sleep(0.05)
  finally:
    for s, h in old.items():
      signal.signal(s, h)
  for t in pumps:
    t.join()
  return status if status >= 0 else 128 - status  # killed by a signal: shell convention


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(
      prog='python -m fiancee_jax.launch', description=__doc__.split('\n\n')[0],
      usage='python -m fiancee_jax.launch -n N [--devices_per_process D] [--port P] -- '
            'script.py [args...]')
  parser.add_argument('-n', '--num_processes', type=int, required=True)
  parser.add_argument('--devices_per_process', type=int, default=2)
  parser.add_argument('--port', type=int, default=None,
                      help='coordinator port on 127.0.0.1 (default: a free one)')
  if '--' not in argv:
    parser.error("expected '--' then the command, e.g. -n 2 -- train.py --config ...")
    return 2
  cut = argv.index('--')
  args = parser.parse_args(argv[:cut])
  command = argv[cut + 1:]
  if not command:
    parser.error("nothing after '--': expected the command, e.g. train.py --config ...")
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error(f'-n {args.num_processes} --devices_per_process {args.devices_per_process}: '
                 'expected positive integers')
  return launch(command, args.num_processes, args.devices_per_process, args.port)


if __name__ == '__main__':
  sys.exit(main())

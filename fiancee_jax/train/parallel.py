"""Data parallelism: one per-device step under `jax.shard_map` (default) or `jax.pmap`, on one
or several processes (hosts).

A step is written per device, `step_fn(state, batch, axis_name=...) -> (state, metrics)`,
with `lax.pmean` on gradients and metrics (and sync batch norm inside the models).
`wrap(step_fn, mode)` returns a `DataParallel` object that owns the device layout, so the
training loop never branches on the mode:

  dp = wrap(step_fn, config.parallel)
  state = dp.put_state(host_state)          # replicated on every device
  state, metrics = dp(state, dp.put_batch(host_batch))
  host_state = dp.get_state(state)          # for checkpoints / sampling

'shard_map' (the default): a ('data',) mesh over all devices of all processes, state
replicated P(), batch P('data'), jitted with the state donated. 'pmap': state with a leading
axis of this process's devices.

Multi-host. Every entry point (train.py, build_bank.py, infer.py) calls `initialize()` first:
it starts `jax.distributed` from JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID
(jax itself reads only the address), or from the cluster on a Cloud TPU VM, a Slurm job
step of several tasks or an Open MPI job of several ranks when none of them is set; on a plain
machine it does nothing. Each process then loads only its share of each global batch (the
loader's process_index / process_count) and `put_batch` assembles the global array from the
processes' local pieces; metrics are replicated on every device, so every process sees the
same numbers and takes the same decisions (`any_process` agrees on a stop request).

Both modes reduce over the devices of every process: the shard_map mesh holds `jax.devices()`
and the pmap is over `jax.devices()` too, which jax runs multi-process with each process
feeding its local devices (the leading axis of a pmap input is `jax.local_device_count()`).
`pmap(devices=jax.local_devices())` would reduce over one host only and train one separate
model per host; tests/test_multihost.py checks both modes on two processes against one process.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fiancee_jax.errors import FianceeError

PyTree = Any
AXIS = 'data'
MODES = ('shard_map', 'pmap')
ENV_COORDINATOR, ENV_NUM, ENV_ID = 'JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'


class DistributedError(FianceeError):
  """Inconsistent multi-process settings in the environment."""


def detected_cluster(environ: Mapping[str, str] | None = None) -> str | None:
  """The multi-process environment jax's own `initialize()` detects and reads, or None:
  'Cloud TPU VM' (TPU chips on this host and libtpu installed: jax takes the process count
  and id from the TPU metadata, one process on a single-host VM), 'Slurm' (a job step of
  several tasks), 'Open MPI' (several ranks). Reads only environment variables and the PCI
  device list: no network, no JAX backend."""
  env = os.environ if environ is None else environ

  def count(name: str) -> int:
    try:
      return int(env.get(name, '1'))
    except ValueError:
      return 1

  slurm = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
           'SLURM_LOCALID')
  if all(k in env for k in slurm) and count('SLURM_NTASKS') > 1:
    return 'Slurm'
  if 'OMPI_MCA_orte_hnp_uri' in env and count('OMPI_COMM_WORLD_SIZE') > 1:
    return 'Open MPI'
  platforms = [p.strip() for p in env.get('JAX_PLATFORMS', '').split(',') if p.strip()]
  if (platforms and 'tpu' not in platforms) or not importlib.util.find_spec('libtpu'):
    return None
  try:
    from jax._src import hardware_utils  # noqa: PLC0415 - jax's own TPU check (sysfs only)
    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  except Exception:  # noqa: BLE001 - no way to tell: a plain machine
    return None
  return 'Cloud TPU VM' if chips > 0 else None


def distributed_settings(environ: Mapping[str, str] | None = None
                         ) -> dict[str, Any] | None:
  """The `jax.distributed.initialize` keyword arguments the environment asks for, or None for
  a single-process run. Explicit settings: JAX_COORDINATOR_ADDRESS (host:port of process 0),
  JAX_NUM_PROCESSES, JAX_PROCESS_ID, all three (a detected cluster may supply what is not
  set). Nothing set: {} on a detected cluster (jax reads it), else None. Inconsistent
  settings raise DistributedError naming the variables."""
  env = os.environ if environ is None else environ
  addr, num, pid = (env.get(k, '').strip() or None for k in (ENV_COORDINATOR, ENV_NUM, ENV_ID))
  cluster = detected_cluster(env)
  if addr is None and num is None and pid is None:
    return {} if cluster else None
  expect = (f'expected all three of {ENV_COORDINATOR}=host:port (process 0), '
            f'{ENV_NUM}=N, {ENV_ID}=0..N-1 on every process')
  if (num is None) != (pid is None):
    given, missing = (ENV_NUM, ENV_ID) if pid is None else (ENV_ID, ENV_NUM)
    raise DistributedError(f'{given} is set but {missing} is not; {expect}')
  kwargs: dict[str, Any] = {}
  if num is not None:
    try:
      n, i = int(num), int(pid)
    except ValueError:
      raise DistributedError(f'{ENV_NUM}={num!r}, {ENV_ID}={pid!r}: expected integers; '
                             f'{expect}') from None
    if n < 1 or not 0 <= i < n:
      raise DistributedError(f'{ENV_NUM}={n}, {ENV_ID}={i}: expected {ENV_NUM} >= 1 and '
                             f'0 <= {ENV_ID} < {ENV_NUM}')
    kwargs.update(num_processes=n, process_id=i)
  elif cluster is None:
    raise DistributedError(f'{ENV_COORDINATOR}={addr!r} is set but {ENV_NUM} and {ENV_ID} are '
                           f'not (jax reads only the address); {expect}')
  if addr is not None:
    host, _, port = addr.rpartition(':')
    if not host or not port.isdigit():
      raise DistributedError(f'{ENV_COORDINATOR}={addr!r}: expected host:port, e.g. '
                             '10.0.0.1:1234')
    kwargs['coordinator_address'] = addr
  elif cluster is None:
    raise DistributedError(f'{ENV_NUM} / {ENV_ID} are set but {ENV_COORDINATOR} is not; '
                           f'{expect}')
  return kwargs


def initialize(environ: Mapping[str, str] | None = None) -> bool:
  """Start `jax.distributed` when the environment asks for a multi-process run (see
  `distributed_settings`); returns True if this process is part of one. Every entry point
  calls it before any other JAX call; a second call is a no-op."""
  if jax.distributed.is_initialized():
    return True
  kwargs = distributed_settings(environ)
  if kwargs is None:
    return False
  jax.distributed.initialize(**kwargs)
  if jax.process_count() > 1 and jax.default_backend() == 'cpu':
    _open_cpu_collectives()
  print(f'[distributed] process {jax.process_index()} of {jax.process_count()}: '
        f'{jax.local_device_count()} of {jax.device_count()} devices', flush=True)
  return True


def _open_cpu_collectives() -> None:
  """Run one collective over every device set the stages use, all processes together.

  On CPU, gloo opens a communicator per set of devices at the first collective over it and
  gives up when another process has not joined within 30 s, as when its compile of the same
  step, or a dataset preparation, takes longer; once open, a communicator serves every later
  program over that set and waits as long as needed. The sets: all devices (the train steps,
  shard_map and pmap alike) and one device per process (`any_process`, the value checks of
  `jax.device_put`, orbax's syncs). Started after a coordination-service barrier, they open
  within milliseconds of each other."""
  from jax.experimental import multihost_utils  # noqa: PLC0415
  barrier('cpu collectives')
  mesh = Mesh(np.array(jax.devices()), (AXIS,))
  ones = jax.make_array_from_process_local_data(
      NamedSharding(mesh, P(AXIS)), np.ones((jax.local_device_count(),), np.float32))
  total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))(ones)
  assert float(total) == jax.device_count(), total
  multihost_utils.process_allgather(np.zeros((1,), np.int32))


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any (one tiny all-gather; every process
  must call it at the same point). One process: `flag`."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return bool(np.any(multihost_utils.process_allgather(np.array([bool(flag)], np.int32))))


# Coordination-service barriers and status keys (no device collective: on CPU, gloo gives up
# when a process reaches its first collective over a set of devices 30 s after another did,
# and a dataset preparation or a compile easily takes longer).
BARRIER_TIMEOUT_S = 24 * 3600
_SYNC_IDS = itertools.count()


def _client():
  from orbax.checkpoint import multihost  # noqa: PLC0415
  return multihost.get_jax_distributed_client()


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
  """Wait until every process reaches this barrier (call in the same order everywhere)."""
  if jax.process_count() > 1:
    _client().wait_at_barrier(f'fiancee/{name}/{next(_SYNC_IDS)}', int(timeout_s * 1000))


def _local_copy(x: Any) -> Any:
  """A replicated global array -> its copy on this process's first device."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return x
  if not x.is_fully_replicated:
    raise DistributedError(f'one_copy of an array sharded over processes ({x.sharding}): '
                           'expected replicated state')
  return x.addressable_shards[0].data


def chief_first(fn: Callable[[], Any], name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> Any:
  """`fn()` on process 0, then on the other processes once it is done: for idempotent
  preparation of shared files (a dataset folder, a cache) that the others then only read.
  When `fn` raises on process 0, the other processes raise DistributedError instead of
  waiting forever. `fn` must not be collective work (orbax reads and writes are: process 0
  would wait in them for the others, which wait here for process 0)."""
  if jax.process_count() == 1:
    return fn()
  key = f'fiancee/{name}/{next(_SYNC_IDS)}'
  if jax.process_index() == 0:
    try:
      out = fn()
    except BaseException as e:
      _client().key_value_set(key, f'failed: {type(e).__name__}')
      raise
    _client().key_value_set(key, 'ok')
    return out
  status = _client().blocking_key_value_get(key, int(timeout_s * 1000))
  if status != 'ok':
    raise DistributedError(f'{name}: process 0 {status} (its output says why); this process '
                           'stops too')
  return fn()


def one_process_only(script: str) -> None:
  """One clear error when `script`, whose work runs on one device and writes shared files
  (build_bank.py), was started as several processes."""
  if jax.process_count() > 1:
    raise DistributedError(
        f'{script} runs as one process (process {jax.process_index()} of '
        f'{jax.process_count()}): its work runs on one device and several processes would '
        'write the same files; run it on one host without JAX_NUM_PROCESSES / JAX_PROCESS_ID')


def check_batch_size(global_batch: int, num_devices: int, what: str = 'train.batch_size') -> int:
  """Per-device batch; one clear error when the global batch does not split evenly."""
  if global_batch <= 0 or global_batch % num_devices:
    raise ValueError(f'{what}={global_batch}: the global batch must be a positive multiple of '
                     f'the number of devices ({num_devices})')
  return global_batch // num_devices


class DataParallel:
  """A per-device step wrapped for all devices of all processes (see module docstring)."""

  def __init__(self, step_fn: Callable[..., tuple[PyTree, PyTree]], mode: str = 'shard_map',
               devices: list[Any] | None = None, axis_name: str = AXIS):
    if mode not in MODES:
      raise ValueError(f"parallel={mode!r}: expected one of {MODES}")
    self.mode, self.axis_name = mode, axis_name
    per_device = lambda state, batch: step_fn(state, batch, axis_name=axis_name)
    self.devices = list(devices) if devices is not None else jax.devices()
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    if mode == 'shard_map':
      self.mesh = Mesh(np.array(self.devices), (axis_name,))
      self._replicated = NamedSharding(self.mesh, P())
      self._sharded = NamedSharding(self.mesh, P(axis_name))
      # check_vma=False: the pmap semantics the step is written for. With varying-axis
      # checking on, grad of a replicated param is implicitly psum-ed over devices, and the
      # step's own pmean would then average an already summed gradient (N x too large).
      fn = jax.shard_map(per_device, mesh=self.mesh, in_specs=(P(), P(axis_name)),
                         out_specs=(P(), P()), check_vma=False)
      self._step = jax.jit(fn, donate_argnums=0)
    else:
      self.mesh = None
      # The same device list on every process (all of them): each process feeds and reads
      # the leading-axis entries of its own devices.
      self._step = jax.pmap(per_device, axis_name=axis_name, devices=self.devices,
                            donate_argnums=(0,))
      self._bcast = jax.pmap(lambda x: x, devices=self.devices)

  @property
  def num_devices(self) -> int:
    """Devices over all processes (the global batch is split over these)."""
    return len(self.devices)

  def __call__(self, state: PyTree, batch: PyTree) -> tuple[PyTree, PyTree]:
    state, metrics = self._step(state, batch)
    return state, self.one_copy(metrics)

  def put_state(self, state: PyTree) -> PyTree:
    """Host (or single-device) state -> replicated on every device."""
    if self.mode == 'shard_map':
      return jax.device_put(state, self._replicated)
    n = len(self.local_devices)
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), state)
    return self._bcast(stacked)

  def one_copy(self, state: PyTree) -> PyTree:
    """Replicated device state -> one copy, left on a device of this process (e.g. large
    frozen arrays a sampler reads, without a host round trip). pmap: the first local
    device's entry (no computation, so no process waits for another). shard_map on several
    processes: the copy on this process's first device, for the same reason (a jitted call on
    the global array would wait for the other processes, which do not sample)."""
    if self.mode == 'shard_map':
      if jax.process_count() == 1:
        return state
      return jax.tree.map(_local_copy, state)
    return jax.tree.map(lambda x: x.addressable_shards[0].data[0], state)

  def get_state(self, state: PyTree) -> PyTree:
    """Replicated device state -> host numpy pytree (one copy)."""
    return jax.device_get(self.one_copy(state))

  def put_batch(self, batch: PyTree) -> PyTree:
    """This process's share of the global batch (numpy) -> the per-device layout."""
    leaves = jax.tree.leaves(batch)
    local = leaves[0].shape[0]
    n_local = len(self.local_devices)
    check_batch_size(local * jax.process_count(), self.num_devices, 'global batch')
    if self.mode == 'shard_map':
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(self._sharded, np.asarray(x)), batch)
    return jax.tree.map(lambda x: np.asarray(x).reshape((n_local, local // n_local) + x.shape[1:]),
                        batch)


def wrap(step_fn: Callable[..., tuple[PyTree, PyTree]], mode: str = 'shard_map',
         devices: list[Any] | None = None, axis_name: str = AXIS) -> DataParallel:
  """Wrap a per-device `step_fn(state, batch, axis_name=)` for data parallelism."""
  return DataParallel(step_fn, mode, devices, axis_name)

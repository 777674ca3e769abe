"""Data parallelism: one per-device step under `jax.shard_map` (default) or `jax.pmap`.

A step is written per device, `step_fn(state, batch, axis_name=...) -> (state, metrics)`,
with `lax.pmean` on gradients and metrics (and sync batch norm inside the models).
`wrap(step_fn, mode)` returns a `DataParallel` object that owns the device layout, so the
training loop never branches on the mode:

  dp = wrap(step_fn, config.parallel)
  state = dp.put_state(host_state)          # replicated on every device
  state, metrics = dp(state, dp.put_batch(host_batch))
  host_state = dp.get_state(state)          # for checkpoints / sampling

'shard_map': a ('data',) mesh over all devices, state replicated P(), batch P('data'),
jitted with the state donated. 'pmap': state with a leading device axis.

Multi-host (TPU pods, multi-node GPU): call `maybe_initialize_distributed()` first (train.py
does); each process then loads only its share of the global batch (the loader's
process_index / process_count) and `put_batch` assembles the global array from the
processes' local pieces. Metrics are replicated on every device.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
AXIS = 'data'
MODES = ('shard_map', 'pmap')


def maybe_initialize_distributed() -> bool:
  """`jax.distributed.initialize()` when the environment asks for a multi-process run:
  JAX_COORDINATOR_ADDRESS set (with JAX_NUM_PROCESSES, JAX_PROCESS_ID), or
  FIANCEE_DISTRIBUTED=1 (auto-detection on Cloud TPU pods, SLURM, Open MPI). Returns True if
  it initialised. Must run before any other JAX call."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS') or os.environ.get('FIANCEE_DISTRIBUTED') == '1':
    jax.distributed.initialize()
    return True
  return False


def check_batch_size(global_batch: int, num_devices: int, what: str = 'train.batch_size') -> int:
  """Per-device batch; one clear error when the global batch does not split evenly."""
  if global_batch <= 0 or global_batch % num_devices:
    raise ValueError(f'{what}={global_batch}: the global batch must be a positive multiple of '
                     f'the number of devices ({num_devices})')
  return global_batch // num_devices


class DataParallel:
  """A per-device step wrapped for all devices (see module docstring)."""

  def __init__(self, step_fn: Callable[..., tuple[PyTree, PyTree]], mode: str = 'shard_map',
               devices: list[Any] | None = None, axis_name: str = AXIS):
    if mode not in MODES:
      raise ValueError(f"parallel={mode!r}: expected one of {MODES}")
    self.mode, self.axis_name = mode, axis_name
    per_device = lambda state, batch: step_fn(state, batch, axis_name=axis_name)
    if mode == 'shard_map':
      self.devices = list(devices) if devices is not None else jax.devices()
      self.mesh = Mesh(np.array(self.devices), (axis_name,))
      self._replicated = NamedSharding(self.mesh, P())
      self._sharded = NamedSharding(self.mesh, P(axis_name))
      # check_vma=False: the pmap semantics the step is written for. With varying-axis
      # checking on, grad of a replicated param is implicitly psum-ed over devices, and the
      # step's own pmean would then average an already summed gradient (N x too large).
      fn = jax.shard_map(per_device, mesh=self.mesh, in_specs=(P(), P(axis_name)),
                         out_specs=(P(), P()), check_vma=False)
      self._step = jax.jit(fn, donate_argnums=0)
      self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    else:
      self.devices = list(devices) if devices is not None else jax.local_devices()
      self.local_devices = self.devices
      self.mesh = None
      self._step = jax.pmap(per_device, axis_name=axis_name, devices=self.devices,
                            donate_argnums=(0,))
      self._bcast = jax.pmap(lambda x: x, devices=self.devices)

  @property
  def num_devices(self) -> int:
    """Devices over all processes (the global batch is split over these)."""
    return len(self.devices) * (jax.process_count() if self.mode == 'pmap' else 1)

  def __call__(self, state: PyTree, batch: PyTree) -> tuple[PyTree, PyTree]:
    state, metrics = self._step(state, batch)
    if self.mode == 'pmap':
      metrics = jax.tree.map(lambda x: x[0], metrics)
    return state, metrics

  def put_state(self, state: PyTree) -> PyTree:
    """Host (or single-device) state -> replicated on every device."""
    if self.mode == 'shard_map':
      return jax.device_put(state, self._replicated)
    n = len(self.devices)
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), state)
    return self._bcast(stacked)

  def one_copy(self, state: PyTree) -> PyTree:
    """Replicated device state -> one copy, left on the device (e.g. large frozen arrays
    a sampler reads, without a host round trip)."""
    return jax.tree.map(lambda x: x[0], state) if self.mode == 'pmap' else state

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

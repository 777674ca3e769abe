"""The training-loop skeleton every GAN stage shares.

A stage supplies what is its own -- one step on the next batch, and a `snapshot` that brings
the state to the host and writes samples and / or a checkpoint -- and `run` does the rest:
the SIGTERM / Ctrl-C stop flag (finish the step, write samples, save, return), hooks,
logging cadence (console progress, TensorBoard scalars, a non-finite-loss check), sample
and checkpoint cadence, and the final save when the last step was not saved yet.

  state, step = loop.run(state, start, loop.Cadence.of(config.train), name='backbone',
                         step_fn=..., snapshot=..., writer=writer, saved_step=...)

Several processes: a signal reaches one process (a preempted host) or all of them at different
moments. After every step the processes agree (`parallel.any_process`, one tiny all-gather)
whether any of them was asked to stop, so all of them finish the same step, write the same
snapshot and one checkpoint (orbax's save is itself collective), and return together; a
process leaving the loop alone would wait in the save while the others wait in the next
step's collectives.
"""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from fiancee_jax.train import logging as tlog
from fiancee_jax.train import parallel

PyTree = Any
# (step, device state, device metrics) after each step (tests send signals from here).
Hook = Callable[[int, PyTree, Mapping[str, Any]], None]
# (step, device state, write_samples, write_checkpoint).
Snapshot = Callable[[int, PyTree, bool, bool], None]


class StopFlag:
  """Set by SIGTERM / SIGINT: the loop finishes the current step, saves and returns."""

  def __init__(self):
    self.signum: int | None = None

  def __call__(self, signum, frame):  # noqa: ARG002 (signal handler signature)
    self.signum = signum

  @contextlib.contextmanager
  def installed(self) -> Iterator['StopFlag']:
    """Install as the SIGTERM / SIGINT handler (main thread only) and restore on exit."""
    if threading.current_thread() is not threading.main_thread():
      yield self
      return
    old = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for s, h in old.items():
        signal.signal(s, h)


@dataclasses.dataclass(frozen=True)
class Cadence:
  """How long to train and how often to log, write samples and save (in steps)."""
  num_steps: int
  log_every: int
  sample_every: int
  ckpt_every: int

  @classmethod
  def of(cls, section: Any) -> 'Cadence':
    """From a config section with num_steps, log_every, sample_every, ckpt_every."""
    return cls(int(section.num_steps), int(section.log_every), int(section.sample_every),
               int(section.ckpt_every))


def host_metrics(metrics: Mapping[str, Any], name: str, step: int, hint: str) -> dict[str, float]:
  """Device metrics -> floats; a non-finite loss stops training with one clear error."""
  m = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
  bad = sorted(k for k, v in m.items() if not np.isfinite(v))
  if bad:
    raise FloatingPointError(f'[{name}] non-finite losses {bad} at step {step}: {m}; {hint}')
  return m


def run(state: PyTree, start: int, cadence: Cadence, *, name: str,
        step_fn: Callable[[PyTree], tuple[PyTree, Mapping[str, Any]]],
        snapshot: Snapshot, writer: tlog.MetricWriter, saved_step: int | None,
        hooks: Sequence[Hook] = (), tag: str = 'train',
        console: Callable[[Mapping[str, float]], Mapping[str, float]] | None = None,
        hint: str = 'lower the learning rates or check the data') -> tuple[PyTree, int]:
  """Train from step `start` to `cadence.num_steps` (or a stop signal); returns the final
  device state and step. `step_fn(state) -> (state, metrics)` runs one step on the next
  batch; `saved_step` is the step already in the checkpoint folder (None if none), so the
  final state is saved exactly once. `console` picks the metrics printed (all by default);
  TensorBoard gets every metric under `tag/`."""
  c = cadence
  progress = tlog.Progress(c.num_steps, start, c.log_every, name=name)
  stop = StopFlag()
  step, stopping = start, False
  with stop.installed():
    while step < c.num_steps and not stopping:
      state, metrics = step_fn(state)
      step += 1
      for hook in hooks:
        hook(step, state, metrics)
      if step % c.log_every == 0 or step == c.num_steps:
        m = host_metrics(metrics, name, step, hint)
        progress.update(step, console(m) if console else m)
        writer.scalars(step, {f'{tag}/{k}': v for k, v in m.items()})
        writer.scalars(step, {f'{tag}/steps_per_sec': progress.steps_per_sec})
      stopping = parallel.any_process(stop.signum is not None)
      do_sample = step % c.sample_every == 0 or step == c.num_steps or stopping
      do_ckpt = step % c.ckpt_every == 0 or step == c.num_steps or stopping
      if do_sample or do_ckpt:
        snapshot(step, state, do_sample, do_ckpt)
        if do_ckpt:
          saved_step = step
    if saved_step != step:
      snapshot(step, state, False, True)
    if stopping:
      why = (f'by signal {stop.signum}' if stop.signum is not None
             else 'with the other processes (one of them received a stop signal)')
      print(f'[{name}] stopped {why} after step {step}; checkpoint saved; '
            'rerun the same command to resume', flush=True)
  writer.flush()
  return state, step

"""The shared training-loop skeleton: cadence of logs / samples / checkpoints, final save,
stop on SIGTERM, non-finite losses (a counting step, no model)."""
import os
import signal

import pytest

from fiancee_jax.train import logging as tlog
from fiancee_jax.train import loop


def _run(cadence, start=0, saved_step=None, hooks=(), loss=1.0):
  calls = []

  def step_fn(state):
    return state + 1, {'loss': loss}

  def snapshot(step, state, samples, ckpt):
    assert state == step
    calls.append((step, samples, ckpt))

  state, step = loop.run(start, start, cadence, name='t', step_fn=step_fn, snapshot=snapshot,
                         writer=tlog.MetricWriter('', enabled=False), saved_step=saved_step,
                         hooks=hooks)
  return state, step, calls


def test_cadence_and_final_save(capsys):
  state, step, calls = _run(loop.Cadence(num_steps=7, log_every=3, sample_every=2,
                                         ckpt_every=3))
  assert state == step == 7
  # samples at 2, 4, 6, 7 (last); checkpoints at 3, 6, 7 (last)
  assert calls == [(2, True, False), (3, False, True), (4, True, False), (6, True, True),
                   (7, True, True)]
  logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith('[t]')]
  assert [line.split(' | ')[0] for line in logged] == ['[t] step 3/7', '[t] step 6/7',
                                                      '[t] step 7/7']


def test_resume_at_the_end_saves_nothing_new_and_unsaved_state_is_saved():
  c = loop.Cadence(num_steps=4, log_every=1, sample_every=10, ckpt_every=10)
  assert _run(c, start=4, saved_step=4)[2] == []
  assert _run(c, start=4, saved_step=None)[2] == [(4, False, True)]   # e.g. a 0-step config


def test_sigterm_finishes_the_step_samples_saves_and_returns(capsys):
  def hook(step, state, metrics):  # noqa: ARG001
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
  old = signal.getsignal(signal.SIGTERM)
  state, step, calls = _run(loop.Cadence(10, 5, 5, 5), hooks=[hook])
  assert state == step == 2
  assert calls == [(2, True, True)]
  assert 'stopped by signal' in capsys.readouterr().out
  assert signal.getsignal(signal.SIGTERM) is old   # handler restored


def test_non_finite_loss_is_one_clear_error():
  with pytest.raises(FloatingPointError, match=r"non-finite losses \['loss'\] at step 1"):
    _run(loop.Cadence(3, 1, 10, 10), loss=float('nan'))

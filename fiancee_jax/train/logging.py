"""Training progress: console lines (steps/s, ETA, losses), TensorBoard events, sample PNGs.

TensorBoard event files are written with tensorboardX (no TensorFlow needed):
`tensorboard --logdir <workdir>/tensorboard`. Sample grids also land as PNG files under
`<workdir>/samples/` (written atomically) for people without TensorBoard.
"""
from __future__ import annotations

import os
import time
from typing import Mapping

import numpy as np
from PIL import Image

from fiancee_jax.data.common import colorize
from fiancee_jax.io_utils import atomic_open


def _fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h:d}:{m:02d}:{s:02d}'


class Progress:
  """Console progress every `log_every` steps: step/total, steps/s, ETA, metrics.

  Rates are measured between logged steps (so compilation of the first step is excluded
  after the first report)."""

  def __init__(self, num_steps: int, start_step: int = 0, log_every: int = 10,
               name: str = 'train'):
    self.num_steps, self.log_every, self.name = num_steps, max(int(log_every), 1), name
    self._t, self._step = time.perf_counter(), start_step
    self.steps_per_sec = float('nan')

  def update(self, step: int, metrics: Mapping[str, float]) -> str | None:
    """Call after step `step` (1-based count of finished steps); returns the line logged."""
    if step % self.log_every and step != self.num_steps:
      return None
    now = time.perf_counter()
    if step > self._step:
      self.steps_per_sec = (step - self._step) / max(now - self._t, 1e-9)
    self._t, self._step = now, step
    eta = (self.num_steps - step) / self.steps_per_sec if self.steps_per_sec > 0 else float('nan')
    parts = [f'[{self.name}] step {step}/{self.num_steps}',
             f'{self.steps_per_sec:.2f} steps/s',
             f'ETA {_fmt_duration(eta) if np.isfinite(eta) else "?"}']
    parts += [f'{k} {float(v):.4f}' for k, v in sorted(metrics.items())]
    line = ' | '.join(parts)
    print(line, flush=True)
    return line


class MetricWriter:
  """TensorBoard scalars and images (tensorboardX, written from process 0 only)."""

  def __init__(self, logdir: str, enabled: bool = True):
    self.logdir = logdir
    self._writer = None
    if enabled:
      from tensorboardX import SummaryWriter
      os.makedirs(logdir, exist_ok=True)
      self._writer = SummaryWriter(logdir=logdir)

  def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
    if self._writer is not None:
      for k, v in metrics.items():
        self._writer.add_scalar(k, float(v), global_step=step)

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """uint8 (H, W, 3) image."""
    if self._writer is not None:
      self._writer.add_image(tag, image, global_step=step, dataformats='HWC')

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Images in [-1, 1] -> uint8 [0, 255]."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def sample_grid(labels: np.ndarray, *images: np.ndarray) -> np.ndarray:
  """One row per example: colourised label | each image set in turn (e.g. real | EMA).

  labels: (B, H, W) Cityscapes ids; images: (B, H, W, 3) in [-1, 1]. Returns uint8."""
  rows = []
  for i in range(labels.shape[0]):
    cols = [colorize(np.asarray(labels[i]))] + [to_uint8(x[i]) for x in images]
    rows.append(np.concatenate(cols, axis=1))
  return np.concatenate(rows, axis=0)


def image_grid(*images: np.ndarray) -> np.ndarray:
  """One row per example, the image sets side by side (e.g. source | driver | generated).

  images: each (B, H, W, 3) in [-1, 1]. Returns uint8 (B*H, len(images)*W, 3)."""
  rows = [np.concatenate([to_uint8(x[i]) for x in images], axis=1)
          for i in range(images[0].shape[0])]
  return np.concatenate(rows, axis=0)


def write_png(path: str, image: np.ndarray) -> None:
  """Atomic PNG write (`io_utils.atomic_open`)."""
  with atomic_open(path) as f:
    Image.fromarray(np.ascontiguousarray(image)).save(f, format='PNG')

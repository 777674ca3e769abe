"""Throughput of the perceptual metrics: LPIPS pairs/s and FID-Inception images/s.

Prints one JSON line per figure, at 64x128 and 256x512 with two batch sizes, plus the
TorchScript Inception (fid-helper's `default_1.pt` via torch, if installed) on the same
299x299 batch and the ratio ours/torch. Timings exclude compilation (one warm-up call, then one timed call: a
shared 2-core CPU is noisy, keep the run short).

    .venv/bin/python bench/metrics_speed.py
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from fiancee_jax.metrics import fid, lpips


def _device() -> str:
  d = jax.devices()[0]
  return f'{d.platform}:{d.device_kind} x{jax.device_count()}'


def _time(fn, *args, reps: int = 1) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm-up
  t = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - t) / reps


def _emit(name: str, value: float, unit: str, **kw) -> None:
  print(json.dumps({'name': name, 'value': round(value, 3), 'unit': unit, 'device': _device(), **kw}),
        flush=True)


def main() -> None:
  rng = np.random.default_rng(0)
  lp = lpips.load()
  for (h, w), batches in (((64, 128), (4, 16)), ((256, 512), (1, 2))):
    for b in batches:
      x = jnp.asarray(rng.uniform(-1, 1, (b, h, w, 3)), jnp.float32)
      y = jnp.asarray(rng.uniform(-1, 1, (b, h, w, 3)), jnp.float32)
      dt = _time(lp, x, y)
      _emit('lpips_pairs_per_s', b / dt, 'pairs/s', batch=b, size=f'{h}x{w}')
  inc = fid.load_inception()
  for (h, w) in ((64, 128), (256, 512)):
    b = 4
    x = jnp.asarray(rng.uniform(-1, 1, (b, h, w, 3)), jnp.float32)
    dt = _time(inc, x)
    _emit('fid_images_per_s', b / dt, 'images/s', batch=b, size=f'{h}x{w}',
          note='resize to 299 + Inception pool3')
  try:
    import torch
  except ImportError:
    return
  b = 4
  x = rng.uniform(-1, 0.99, (b, 299, 299, 3)).astype(np.float32)
  ours = b / _time(jax.jit(fid.apply_model), inc.params, jnp.asarray(x))
  model = torch.jit.load(fid.inception_weights.default_path(), map_location='cpu').eval()
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    model(xt)
    t = time.perf_counter()
    model(xt)
    ref = b / (time.perf_counter() - t)
  _emit('fid_inception_torchscript_images_per_s', ref, 'images/s', batch=b, size='299x299',
        threads=torch.get_num_threads())
  _emit('fid_inception_ours_over_torchscript', ours / ref, 'ratio', batch=b, size='299x299',
        ours_images_per_s=round(ours, 3))


if __name__ == '__main__':
  main()

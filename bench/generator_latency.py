"""Latency of the jitted JAX OASIS generator vs the PyTorch reference (eval, no_grad), same
weights (the PyTorch state_dict converted by fiancee_jax.backbones.oasis.torch_weights), same device.

  python bench/generator_latency.py [--configs configs/oasis_synthetic.py,configs/oasis_synthetic.py@128x256]
      [--batches 1,8] [--repeats 10] [--threads N]

One JSON line per (config, batch): median seconds of each after warm-up, and jax/torch.
Needs torch (a test/bench dependency only).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _median_time(fn, repeats: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def bench_config(path: str, batches: list[int], repeats: int) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import torch

  from fiancee_jax import config as cfg
  from fiancee_jax import registry
  from fiancee_jax.backbones.oasis import torch_weights as oasis_torch
  from tests.torch_oasis_ref import OASISGenerator

  spec, _, size = path.partition('@')  # 'configs/x.py[:arg][@HxW]' overrides the resolution
  config = cfg.load(spec)
  if size:
    with config.unlocked():
      config.data.height, config.data.width = (int(v) for v in size.split('x'))
    cfg.validate(config)
  bb = registry.get(config)
  m, d = config.model, config.data
  torch.manual_seed(0)
  ref = OASISGenerator(d.num_classes, d.height, d.width, ch=m.ch, z_dim=m.z_dim,
                       hidden=m.spade_hidden)
  ref.init_weights(0.02)
  with torch.no_grad():  # BN running stats from train-mode passes (fresh stats saturate tanh)
    ref.train()
    for _ in range(3):
      ids = torch.randint(0, d.num_classes, (2, d.height, d.width))
      ref(torch.nn.functional.one_hot(ids, d.num_classes).permute(0, 3, 1, 2).float())
  ref.eval()
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = os.path.join(tmp, 'bench_EMA.pth')
    torch.save(ref.state_dict(), ckpt)
    g = bb.generator()
    variables = oasis_torch.import_generator(ckpt, g)
  fwd = jax.jit(lambda v, s, z: g.apply(v, s, z, False)[0])
  rows = []
  for b in batches:
    rng = np.random.default_rng(b)
    onehot = np.eye(d.num_classes, dtype=np.float32)[rng.integers(0, d.num_classes,
                                                                  (b, d.height, d.width))]
    z = rng.normal(size=(b, m.z_dim)).astype(np.float32)
    s_j, z_j = jnp.asarray(onehot), jnp.asarray(z)
    s_t = torch.from_numpy(np.ascontiguousarray(onehot.transpose(0, 3, 1, 2)))
    z_t = torch.from_numpy(z)
    t_jax = _median_time(lambda: fwd(variables, s_j, z_j).block_until_ready(), repeats)
    with torch.no_grad():
      t_torch = _median_time(lambda: ref(s_t, z_t), repeats)
      diff = float(np.abs(np.asarray(fwd(variables, s_j, z_j)) -
                          ref(s_t, z_t).numpy().transpose(0, 2, 3, 1)).max())
    rows.append({'name': 'oasis_generator_latency', 'config': path, 'batch': b,
                 'resolution': [d.height, d.width], 'ch': m.ch, 'value': t_jax, 'unit': 's',
                 'jax_s': t_jax, 'torch_s': t_torch, 'ratio_jax_over_torch': t_jax / t_torch,
                 'max_abs_diff': diff, 'repeats': repeats,
                 'device': f'{jax.devices()[0].platform} ({platform.processor() or platform.machine()}'
                           f', {os.cpu_count()} cores), torch threads {torch.get_num_threads()}'})
  return rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--configs', default='configs/oasis_synthetic.py,configs/oasis_synthetic.py@128x256')
  ap.add_argument('--batches', default='1,8')
  ap.add_argument('--repeats', type=int, default=10)
  ap.add_argument('--threads', type=int, default=0, help='torch intra-op threads (0: default)')
  a = ap.parse_args()
  if a.threads:
    import torch
    torch.set_num_threads(a.threads)
  for path in a.configs.split(','):
    for row in bench_config(path, [int(b) for b in a.batches.split(',')], a.repeats):
      print(json.dumps(row), flush=True)


if __name__ == '__main__':
  main()

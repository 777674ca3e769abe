"""Latency of the jitted JAX OASIS generator vs the PyTorch reference (eval, no_grad; eager
and `torch.compile`d where it works on this machine), same weights (the PyTorch state_dict
converted by fiancee_jax.backbones.oasis.torch_weights), same device, same inputs; with
--workdir also routed FIANCEE in JAX (that workdir's trained pipeline at --threshold, the
calibrated rule) on those inputs.

  python bench/generator_latency.py [--configs configs/oasis_synthetic.py,configs/oasis_synthetic.py@128x256]
      [--batches 1,8] [--repeats 10] [--threads N] [--no_compile]
      [--workdir runs/demo --workdir_config configs/oasis_synthetic.py --threshold 0.1]

One JSON line per (config, batch): median seconds of each after warm-up, and the ratios.
The routed column ('routed_s': batch 1 `Engine.routed_one`, larger `Engine.routed_batch`)
is for the config that equals --workdir_config (the workdir's weights; its inputs are the
workdir's test label maps and noises, cycled, for every column); without --workdir it is left
out with the reason printed. Needs torch (a test/bench dependency only).
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


def bench_config(path: str, batches: list[int], repeats: int, routed: dict | None = None,
                 compile_torch: bool = True) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import torch

  from fiancee_jax import config as cfg
  from fiancee_jax import registry
  from fiancee_jax.backbones.oasis import torch_weights as oasis_torch
  from tests.backbones.oasis.torch_oasis_ref import OASISGenerator

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
  compiled, compile_note = None, 'off (--no_compile)'
  if compile_torch:
    try:
      compiled = torch.compile(ref, dynamic=False)  # one static program per batch size
      with torch.no_grad():
        compiled(torch.zeros(1, d.num_classes, d.height, d.width), torch.zeros(1, m.z_dim))
      compile_note = 'ok'
    except Exception as e:  # noqa: BLE001 - inductor needs a working C++ toolchain
      compiled, compile_note = None, f'torch.compile failed: {type(e).__name__}: {e}'[:300]
  rows = []
  for b in batches:
    if routed is not None:
      ids, z = routed['labels'][:b], routed['z'][:b]
    else:
      rng = np.random.default_rng(b)
      ids = rng.integers(0, d.num_classes, (b, d.height, d.width))
      z = rng.normal(size=(b, m.z_dim)).astype(np.float32)
    onehot = np.eye(d.num_classes, dtype=np.float32)[ids]
    s_j, z_j = jnp.asarray(onehot), jnp.asarray(z)
    s_t = torch.from_numpy(np.ascontiguousarray(onehot.transpose(0, 3, 1, 2)))
    z_t = torch.from_numpy(z)
    t_jax = _median_time(lambda: fwd(variables, s_j, z_j).block_until_ready(), repeats)
    with torch.no_grad():
      t_torch = _median_time(lambda: ref(s_t, z_t), repeats)
      t_comp = (_median_time(lambda: compiled(s_t, z_t), repeats) if compiled is not None
                else None)
      diff = float(np.abs(np.asarray(fwd(variables, s_j, z_j)) -
                          ref(s_t, z_t).numpy().transpose(0, 2, 3, 1)).max())
    row = {'name': 'oasis_generator_latency', 'config': path, 'batch': b,
           'resolution': [d.height, d.width], 'ch': m.ch, 'value': t_jax, 'unit': 's',
           'jax_s': t_jax, 'torch_s': t_torch, 'ratio_jax_over_torch': t_jax / t_torch,
           'torch_compile_s': t_comp, 'torch_compile': compile_note,
           'max_abs_diff': diff, 'repeats': repeats,
           'inputs': 'workdir test maps' if routed is not None else 'random ids',
           'device': f'{jax.devices()[0].platform} ({platform.processor() or platform.machine()}'
                     f', {os.cpu_count()} cores), torch threads {torch.get_num_threads()}'}
    if routed is not None:
      row.update(_routed_row(routed, ids, z, b, repeats, t_torch, t_comp))
    rows.append(row)
  return rows


def _routed_row(routed: dict, ids, z, b: int, repeats: int, t_torch: float,
                t_comp: float | None) -> dict:
  """Routed FIANCEE (the workdir's pipeline, JAX) on the batch (ids, z)."""
  import jax.numpy as jnp
  eng, t, off = routed['engine'], routed['threshold'], routed['offset']
  x = (jnp.asarray(ids, jnp.int32), jnp.asarray(z))
  if b == 1:
    c32 = jnp.asarray(eng.costs, jnp.float32)
    fn = lambda: eng.routed_one(eng.params, x, jnp.float32(t), c32,  # noqa: E731
                                jnp.float32(off))[0].block_until_ready()
    exits = np.array([int(eng.routed_one(eng.params, x, jnp.float32(t), c32,
                                         jnp.float32(off))[1]['exit'])])
  else:
    fn = lambda: eng.routed_batch(x, t, off)[0].block_until_ready()  # noqa: E731
    exits = eng.routed_batch(x, t, off)[1]
  t_r = _median_time(fn, repeats)
  out = {'routed_s': t_r, 'ratio_routed_over_torch': t_r / t_torch,
         'routed_threshold': t, 'routed_rule': routed['rule'], 'routed_offset': off,
         'routed_workdir': routed['workdir'],
         'routed_mean_gmacs': float(eng.costs[exits].mean()),
         'backbone_gmacs': float(eng.costs[-1])}
  if t_comp:
    out['ratio_routed_over_torch_compile'] = t_r / t_comp
  return out


def load_routed(workdir: str, config_path: str, threshold: float, n: int) -> dict:
  """The workdir's engine, the calibrated offset at `threshold`, and n test inputs (label
  ids (n, H, W), noises (n, z_dim)): the test split's, cycled with fresh noises."""
  from fiancee_jax import config as cfg
  from fiancee_jax import registry
  from fiancee_jax.core import predictor_data
  from fiancee_jax.infer import engine as engine_lib
  from fiancee_jax.infer import inputs as inputs_lib
  from fiancee_jax.infer import rules
  config = cfg.load(config_path)
  bb = registry.get(config)
  eng = engine_lib.Engine(engine_lib.load(bb, workdir))
  rule = rules.calibrate(rules.check(default_alpha=float(config.routing.alpha)), bb, workdir,
                         eng.pipeline)
  off = rule.offset(threshold, eng.costs)
  off = off if np.isfinite(off) else (1e9 if off > 0 else -1e9)
  test = predictor_data.dataset(bb, workdir, 'test', eng.pipeline)
  (labels, z), _ = bb.infer_inputs().from_rows(workdir, test)
  reps = -(-n // len(labels))
  labels = np.concatenate([labels] * reps)[:n]
  fresh = np.stack([inputs_lib.noise(config, 10_000 + i) for i in range(n)])
  z = np.where(np.arange(n)[:, None] < len(test['z']), np.concatenate([z] * reps)[:n], fresh)
  eng.warm(like=(labels[:1], z[:1]))
  return {'engine': eng, 'threshold': threshold, 'offset': float(off), 'rule': rule.name,
          'workdir': workdir, 'labels': labels, 'z': z.astype(np.float32)}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--configs', default='configs/oasis_synthetic.py,configs/oasis_synthetic.py@128x256')
  ap.add_argument('--batches', default='1,8')
  ap.add_argument('--repeats', type=int, default=10)
  ap.add_argument('--threads', type=int, default=0, help='torch intra-op threads (0: default)')
  ap.add_argument('--no_compile', action='store_true', help='skip the torch.compile column')
  ap.add_argument('--workdir', default=None, help='a trained workdir: adds the routed column')
  ap.add_argument('--workdir_config', default='configs/oasis_synthetic.py')
  ap.add_argument('--threshold', type=float, default=0.1)
  a = ap.parse_args()
  if a.threads:
    import torch
    torch.set_num_threads(a.threads)
  batches = [int(b) for b in a.batches.split(',')]
  routed = None
  if a.workdir is None:
    print('[generator_latency] no routed column: give --workdir (a trained workdir of '
          f'{a.workdir_config}) for routed FIANCEE', file=sys.stderr, flush=True)
  elif not os.path.isdir(os.path.join(a.workdir, 'checkpoints', 'predictor')):
    print(f'[generator_latency] no routed column: {a.workdir} has no trained predictor stage',
          file=sys.stderr, flush=True)
  else:
    routed = load_routed(a.workdir, a.workdir_config, a.threshold, max(batches))
  for path in a.configs.split(','):
    use = routed if routed is not None and path == a.workdir_config else None
    for row in bench_config(path, batches, a.repeats, use, not a.no_compile):
      print(json.dumps(row), flush=True)


if __name__ == '__main__':
  main()

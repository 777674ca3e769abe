"""On paper: what the backbone GAN train step needs per device at the paper configs, compiled
on CPU and never run.

  python bench/train_memory.py [--configs configs/oasis_cityscapes.py,configs/megaportraits_voxceleb2.py]
      [--batches 1,2,4] [--remat off,on] [--tflops 100] [--quick]

For each config x per-device batch x `train.remat`: the step train.py --stage=backbone runs
(`train/gan.py`: the adapter's `gan_task(parallel.AXIS).train_step` under `parallel.wrap`,
shard_map over a 1-device mesh, state donated), lowered from abstract inputs
(`jax.ShapeDtypeStruct`s from `jax.eval_shape`: no paper-size array is made) and compiled
by XLA:CPU. From `compiled.memory_analysis()`:
  peak_bytes = argument + output + temp - alias   (alias: outputs written into the donated
               state's buffers; generated code is listed apart, it is not device memory)
and from the step's jaxpr (`metrics.macs.count_macs`: every conv / dot of the forward
passes, the backward passes and, with remat, the recomputed forwards; taps on zero padding
included, the paper's convention): GMACs per step and per example. Time at a throughput
--tflops (effective, TFLOP/s, 1 MAC = 2 FLOPs): seconds per step, per epoch (dataset size:
--epoch_examples, default 2975 = the Cityscapes train split for `cityscapes`; none known for
`video_frames`) and for the config's whole run (train.num_steps at train.batch_size).

XLA:CPU plans buffers differently from XLA:GPU / TPU (other fusions, layouts, no
rematerialisation pass of its own, the CPU-only im2col weight gradient of even-kernel
convs in nn/layers.py): the figures are estimates of the program's footprint, not a
measurement on an accelerator. One JSON line per measurement (with the machine), then a
markdown table. --quick: OASIS only, batch 1 (remat off and on). The branch stage's step is
not built (a `train_memory/skipped` line says why).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from typing import Any

# LLVM's optimisation level changes the machine code only, not XLA's HLO passes or buffer
# assignment (memory_analysis is the same at 0 and 2 on the tiny config: tests/train/
# test_memory.py); 0 compiles several times faster, and nothing here runs.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0').strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from fiancee_jax import config as cfg  # noqa: E402
from fiancee_jax import registry  # noqa: E402
from fiancee_jax.metrics import macs as macs_lib  # noqa: E402
from fiancee_jax.train import parallel  # noqa: E402
from fiancee_jax.train.state import GANState, StepState, split_variables  # noqa: E402

PAPER = ('configs/oasis_cityscapes.py', 'configs/megaportraits_voxceleb2.py')
EPOCH_EXAMPLES = {'cityscapes': 2975}   # Cityscapes gtFine train split
GB = 1e9


def machine() -> str:
  d = jax.devices()[0]
  return (f'{d.platform}:{getattr(d, "device_kind", d.platform)} '
          f'({platform.processor() or platform.machine()}, {os.cpu_count()} cpus, jax {jax.__version__})')


def _sds(tree: Any, sharding=None) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def batch_spec(config, batch: int) -> dict[str, tuple[tuple[int, ...], Any]]:
  """The loader batch of a backbone (what its `train_step` reads), as shapes and dtypes."""
  h, w = config.data.height, config.data.width
  if config.backbone == 'oasis':     # backbones/oasis/gan.py BATCH_KEYS
    return {'image': ((batch, h, w, 3), jnp.uint8), 'label': ((batch, h, w), jnp.uint8)}
  if config.backbone == 'megaportraits':   # video_frames pairs: no driver_pose
    spec = {'source_image': ((batch, h, w, 3), jnp.uint8),
            'driver_image': ((batch, h, w, 3), jnp.uint8),
            'driver_mask': ((batch, h, w), jnp.uint8)}
    if config.data.name == 'synthetic_heads':
      spec['driver_pose'] = ((batch, 3), jnp.float32)
    return spec
  raise ValueError(f'train_memory: no batch layout for backbone {config.backbone!r}')


def abstract_state(task) -> GANState:
  """The step's GANState as ShapeDtypeStructs (what gan.create_train_state builds, minus
  `init_params`' host-side rescale, which keeps shapes)."""
  def init():
    k_g, k_d, k_train = jax.random.split(jax.random.PRNGKey(0), 3)
    g_vars, d_vars = task.init_variables(k_g, k_d)
    params_g, state_g = split_variables(g_vars)
    params_d, state_d = split_variables(d_vars)
    return GANState(step=jnp.zeros((), jnp.int32), params_g=params_g, params_d=params_d,
                    state_g=state_g, state_d=state_d, ema_params_g=params_g,
                    ema_state_g=state_g, opt_g=task.tx_g.init(params_g),
                    opt_d=task.tx_d.init(params_d), rng=k_train)
  return jax.eval_shape(init)


def backbone_step(config, per_device_batch: int, remat: bool):
  """(jitted data-parallel step over one device, abstract StepState, abstract batch)."""
  config = cfg.validate(config.copy_and_resolve_references())
  with config.unlocked():
    config.train.remat = bool(remat)
  backbone = registry.get(config)
  task = backbone.gan_task(parallel.AXIS)
  dp = parallel.wrap(task.train_step, 'shard_map', jax.devices()[:1], task.axis_name)
  repl, shard = NamedSharding(dp.mesh, P()), NamedSharding(dp.mesh, P(dp.axis_name))
  frozen = _sds(task.frozen(), repl)          # the VGG19 trunk (host arrays) or {}
  state = StepState(train=_sds(abstract_state(task), repl), frozen=frozen)
  batch = {k: jax.ShapeDtypeStruct(s, d, sharding=shard)
           for k, (s, d) in batch_spec(config, per_device_batch).items()}
  return dp._step, state, batch, config   # dp._step: the jit train.py calls (donates state)


def measure(config, per_device_batch: int, remat: bool, *, tflops: float = 100.0,
            epoch_examples: int | None = None, count_macs: bool = True) -> dict[str, Any]:
  """One measurement: compiled memory (bytes) and MACs of the backbone step."""
  step, state, batch, config = backbone_step(config, per_device_batch, remat)
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  t_lower = time.perf_counter() - t0
  compiled = lowered.compile()
  t_compile = time.perf_counter() - t0 - t_lower
  m = compiled.memory_analysis()
  arg, out = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
  tmp, alias = int(m.temp_size_in_bytes), int(m.alias_size_in_bytes)
  row = {'name': 'train_memory/backbone', 'config': config.name, 'backbone': config.backbone,
         'resolution': [config.data.height, config.data.width], 'dtype': config.dtype,
         'per_device_batch': per_device_batch, 'remat': bool(remat),
         'argument_bytes': arg, 'output_bytes': out, 'temp_bytes': tmp, 'alias_bytes': alias,
         'generated_code_bytes': int(m.generated_code_size_in_bytes),
         'peak_bytes': arg + out + tmp - alias, 'peak_gb': round((arg + out + tmp - alias) / GB, 3),
         'lower_s': round(t_lower, 1), 'compile_s': round(t_compile, 1), 'device': machine()}
  del compiled, lowered
  if count_macs:
    n = macs_lib.count_macs(step, state, batch)
    per_ex = n / per_device_batch
    row.update(gmacs_per_step=round(n / 1e9, 1), gmacs_per_example=round(per_ex / 1e9, 1))
    row.update(timing(config, per_ex, tflops, epoch_examples))
  return row


def timing(config, macs_per_example: float, tflops: float,
           epoch_examples: int | None = None) -> dict[str, Any]:
  """Seconds per global step / epoch / whole run at `tflops` effective (2 FLOPs per MAC)."""
  sec_per_example = 2 * macs_per_example / (tflops * 1e12)
  t = config.train
  sig = lambda x: float(f'{x:.4g}')  # noqa: E731  (4 significant digits, never rounded to 0)
  out = {'tflops': tflops, 'global_batch': int(t.batch_size),
         's_per_global_step': sig(sec_per_example * t.batch_size),
         'run_hours': sig(sec_per_example * t.batch_size * t.num_steps / 3600)}
  n = epoch_examples if epoch_examples else EPOCH_EXAMPLES.get(config.data.name)
  out['epoch_examples'] = n
  out['s_per_epoch'] = sig(sec_per_example * n) if n else None
  return out


def largest_batch(peaks: dict[int, float], cap_gb: float) -> str:
  """Largest per-device batch whose peak fits `cap_gb`: measured, or '~n' from the line
  through the smallest and largest measured batches when every measured one fits."""
  ok = [b for b, p in peaks.items() if p <= cap_gb]
  if not ok:
    return 'none'
  lo, hi = min(peaks), max(peaks)
  if len(ok) < len(peaks) or hi == lo:
    return str(max(ok))
  slope = (peaks[hi] - peaks[lo]) / (hi - lo)
  return f'~{int((cap_gb - (peaks[lo] - slope * lo)) // slope)}' if slope > 0 else str(hi)


def table(rows: list[dict]) -> str:
  """Markdown: one row per (config, remat), one column per batch."""
  batches = sorted({r['per_device_batch'] for r in rows})
  lines = ['| config | remat | ' + ' | '.join(f'batch {b}: peak GB (temp)' for b in batches)
           + ' | GMACs / example | s / epoch | h / run | largest batch in 16 / 40 / 80 GB |',
           '|---|---|' + '---|' * (len(batches) + 4)]
  keys = sorted({(r['config'], r['remat']) for r in rows}, key=lambda k: (k[0], k[1]))
  for name, remat in keys:
    sel = {r['per_device_batch']: r for r in rows if (r['config'], r['remat']) == (name, remat)}
    cells = [f"{sel[b]['peak_gb']:.2f} ({sel[b]['temp_bytes'] / GB:.2f})" if b in sel else '-'
             for b in batches]
    any_r = sel[min(sel)]
    peaks = {b: r['peak_gb'] for b, r in sel.items()}
    fits = ' / '.join(largest_batch(peaks, cap) for cap in (16, 40, 80))
    epoch = any_r.get('s_per_epoch')
    lines.append(f"| {name} | {'on' if remat else 'off'} | " + ' | '.join(cells) +
                 f" | {any_r.get('gmacs_per_example', '-')} | "
                 f"{epoch if epoch is not None else '-'} | {any_r.get('run_hours', '-')} | "
                 f"{fits} |")
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--configs', default=','.join(PAPER))
  ap.add_argument('--batches', default='1,2,4')
  ap.add_argument('--remat', default='off,on')
  ap.add_argument('--tflops', type=float, default=100.0,
                  help='effective throughput (TFLOP/s) for the time columns')
  ap.add_argument('--epoch_examples', type=int, default=None,
                  help='examples per epoch (default: 2975 for cityscapes, else none)')
  ap.add_argument('--max_compile_s', type=float, default=900.0,
                  help='skip the larger batches of a (config, remat) once one compile took '
                       'longer than this')
  ap.add_argument('--quick', action='store_true', help='OASIS only, batch 1')
  a = ap.parse_args(argv)
  configs = a.configs.split(',') if not a.quick else [PAPER[0]]
  batches = [int(b) for b in a.batches.split(',')] if not a.quick else [1]
  remats = [{'off': False, 'on': True}[r] for r in a.remat.split(',')]
  rows = []
  for path in configs:
    config = cfg.load(path)
    for remat in remats:
      slow = False
      for b in batches:
        if slow:
          print(json.dumps({'name': 'train_memory/skipped', 'config': config.name,
                            'per_device_batch': b, 'remat': remat,
                            'why': f'the previous compile took > {a.max_compile_s} s'}),
                flush=True)
          continue
        row = measure(config, b, remat, tflops=a.tflops, epoch_examples=a.epoch_examples)
        rows.append(row)
        print(json.dumps(row), flush=True)
        slow = row['compile_s'] > a.max_compile_s
        gc.collect()
        jax.clear_caches()
  if any('oasis_cityscapes' in p for p in configs):
    print(json.dumps({
        'name': 'train_memory/skipped', 'stage': 'branches', 'config': 'oasis_cityscapes',
        'why': 'not built: its frozen inputs include the bank (a core/bank pytree; at float32 '
               '(512, 4, 4) values for ~122k keys, as bench/retrieval.py sizes the paper bank, '
               'about 4 GB), which this bench would have to rebuild abstractly, and one '
               'paper-size compile already takes 3-5 min on this shared 2-core CPU'}),
        flush=True)
  print()
  print(f'Backbone train step, per device, XLA:CPU compile ({machine()}); peak = argument + '
        f'output + temp - alias; time at {a.tflops:g} TFLOP/s effective')
  print(table(rows))
  sys.stdout.flush()


if __name__ == '__main__':
  main()

"""Bank retrieval speed: on-device backend vs FAISS callback on a bank of the paper's size.

Random bank of 122,100 keys x 1024 d in 35 classes (Sec. S1.1.1: <= 5000 per class; here 24
classes of 5000 and 11 sharing 2100), query classes drawn in proportion to class sizes.
One input = one 8x16 key grid = 128 queries; batch 1 and 64 inputs. Each figure is the
median over runs after warm-up (compilation + FAISS index build excluded), within a time
budget per setting. Values are (4, 4, 8) patches by default, not the paper's (4, 4, 512):
the gather costs the same for both backends, and the paper's values take 4 GB of RAM
(`--value-channels 512` to use them). The 1-minute load average is printed with each
figure: on a shared CPU the timings move with it. The paper quotes retrieval <= 5 ms on a P40 GPU
(Sec. S1.1.1, next to the MegaPortraits database figure).

  python bench/retrieval.py                 # prints one JSON line per figure
  python bench/retrieval.py --batches 1 --num-keys 20000   # quick look
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fiancee_jax.core import bank as bk

PAPER_MS_PER_INPUT = 5.0  # Sec. S1.1.1: "retrieval latency is up to 5 ms" on a P40


def class_sizes(num_keys: int, num_classes: int, max_per_class: int) -> np.ndarray:
  """As many full classes as fit, the rest shared evenly by the remaining classes."""
  full = min(num_classes - 1, (num_keys - num_classes + 1) // max_per_class)
  rest = num_keys - full * max_per_class
  tail = np.full(num_classes - full, rest // (num_classes - full))
  tail[: rest % (num_classes - full)] += 1
  return np.concatenate([np.full(full, max_per_class), tail]).astype(np.int64)


def timed(fn, args, budget_s: float) -> tuple[float, int]:
  """Median wall time of runs repeated until `budget_s` is spent (at least one run)."""
  times = []
  start = time.perf_counter()
  while not times or (time.perf_counter() - start < budget_s and len(times) < 50):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times), len(times)


def _faiss_threads() -> int:
  import faiss  # noqa: PLC0415
  return faiss.omp_get_max_threads()


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--num-keys', type=int, default=122_100)
  p.add_argument('--dim', type=int, default=1024)
  p.add_argument('--num-classes', type=int, default=35)
  p.add_argument('--max-per-class', type=int, default=5000)
  p.add_argument('--value-channels', type=int, default=8)
  p.add_argument('--batches', default='1,64')
  p.add_argument('--budget-s', type=float, default=15.0, help='timing budget per setting')
  args = p.parse_args()

  rng = np.random.default_rng(0)
  sizes = class_sizes(args.num_keys, args.num_classes, args.max_per_class)
  classes = np.repeat(np.arange(args.num_classes), sizes).astype(np.int32)
  keys = rng.standard_normal((args.num_keys, args.dim), dtype=np.float32)
  values = rng.standard_normal((args.num_keys, 4, 4, args.value_channels), dtype=np.float32)
  bank = bk.make_bank(keys, values, classes, args.num_classes)
  del values
  device = f'{jax.devices()[0].platform}:{jax.devices()[0].device_kind}'
  threads = _faiss_threads()
  common = dict(num_keys=args.num_keys, dim=args.dim, device=device)

  for batch in [int(b) for b in args.batches.split(',')]:
    q = jnp.asarray(rng.standard_normal((batch, 8, 16, args.dim), dtype=np.float32))
    qc = jnp.asarray(rng.choice(args.num_classes, size=(batch, 8, 16), p=sizes / sizes.sum())
                     .astype(np.int32))
    ms = {}
    guides = {}
    for backend in ('device', 'faiss'):
      t0 = time.perf_counter()
      compiled = jax.jit(lambda b, x, c, _be=backend: bk.retrieve(b, x, c, backend=_be)) \
          .lower(bank, q, qc).compile()
      guides[backend] = np.asarray(compiled(bank, q, qc))  # warm-up run
      warm = time.perf_counter() - t0
      med, runs = timed(compiled, (bank, q, qc), args.budget_s)
      ms[backend] = 1e3 * med / batch
      print(json.dumps(dict(name='retrieval_ms_per_input', value=round(ms[backend], 3), unit='ms',
                            backend=backend, batch=batch, runs=runs, warmup_s=round(warm, 1),
                            loadavg=round(os.getloadavg()[0], 2), faiss_threads=threads,
                            **common)), flush=True)
      print(json.dumps(dict(name='retrieval_queries_per_s', value=round(batch * 128 / med, 1),
                            unit='queries/s', backend=backend, batch=batch, **common)), flush=True)
    same = bool(np.array_equal(guides['device'], guides['faiss']))
    print(json.dumps(dict(name='retrieval_ratio_faiss_over_device',
                          value=round(ms['faiss'] / ms['device'], 3), unit='x', batch=batch,
                          same_neighbours=same, **common)), flush=True)
  print(json.dumps(dict(name='paper_retrieval_ms_per_input', value=PAPER_MS_PER_INPUT, unit='ms',
                        backend='faiss', batch=1, device='gpu:Tesla P40 (paper, Sec. S1.1.1)')))


if __name__ == '__main__':
  main()

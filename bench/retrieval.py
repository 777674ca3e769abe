"""Bank retrieval on a bank of the paper's size, every backend x index, next to the cheapest
paper-size route on the same machine, in one run.

Random bank of 122,100 keys x 1024 d in 35 classes (Sec. S1.1.1: <= 5000 per class; here 24
classes of 5000 and 11 sharing 2100), query classes drawn in proportion to class sizes.
One input = one 8x16 key grid = 128 queries; batch 1 and 64 inputs. For each index ('flat'
exact, 'ivf' both backends, 'hnsw' FAISS only) and backend ('device', 'faiss'): ms per input
(median over runs after warm-up: compilation and index builds excluded, within a time budget
per setting), recall@1 against the exact neighbours of the same queries, and the index build
time. Recall on i.i.d. normal keys and queries is a worst case (no structure for the coarse
quantiser to use: the nearest key is barely nearer than the rest); `recall_at_1_near` is on
queries drawn next to a key (key + N(0, 1) noise), a best case; real features lie between.

Then: which backend was faster here at each batch (exact search) next to what backend 'auto'
resolves to on this platform, and the cheapest route (exit 1) of configs/oasis_cityscapes.py
at batch 1 (random weights, jitted; its bank is 8 keys per class with the paper's (4, 4, 512)
values, so the route's own retrieval is negligible and the paper-size search time is added to
it), with the ratio retrieval / route. Values of the timed bank are (4, 4, 8) patches by
default, not the paper's (4, 4, 512): the gather costs the same for both backends, and the
paper's values take 4 GB of RAM (`--value-channels 512`). The 1-minute load average is printed
with each figure: on a shared CPU the timings move with it. The paper quotes retrieval <= 5 ms
on a P40 GPU (Sec. S1.1.1); issue 16 quotes it as 16% of the route there.

  python bench/retrieval.py            # one JSON line per figure (~10 min on 2 cores)
  python bench/retrieval.py --quick    # small bank, batch 1 and 8, the tiny route (~1 min)
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from fiancee_jax.core import bank as bk  # noqa: E402
from fiancee_jax.core.bank import index as ix  # noqa: E402

PAPER_MS_PER_INPUT = 5.0  # Sec. S1.1.1: "retrieval latency is up to 5 ms" on a P40
PAPER_SHARE_OF_ROUTE = 0.16  # issue 16: retrieval = 16% of the route's time on a P40


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


def machine() -> dict:
  """Where the figures come from."""
  import faiss  # noqa: PLC0415
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  dev = jax.devices()[0]
  return dict(platform=dev.platform, device_kind=dev.device_kind, cpu=cpu, cores=os.cpu_count(),
              jax=jax.__version__, faiss=faiss.__version__, faiss_threads=faiss.omp_get_max_threads(),
              faiss_gpus=ix.faiss_gpu_count(faiss))


def emit(**row):
  print(json.dumps(row), flush=True)


def _search_fn(backend: str):
  def f(b, x, c):
    ids = bk.nearest(b, x, c, backend=backend)
    return bk.glue(b.values, ids), ids
  return jax.jit(f)


def bench_retrieval(args, rng, common) -> dict:
  """Every (index, backend) at every batch, FAISS at each thread count (0: its default);
  returns {(index, backend, faiss threads or None, batch): ms per input}."""
  import faiss  # noqa: PLC0415
  default_threads = faiss.omp_get_max_threads()
  threads = [int(t) for t in args.faiss_threads.split(',')]
  sizes = class_sizes(args.num_keys, args.num_classes, args.max_per_class)
  classes = np.repeat(np.arange(args.num_classes), sizes).astype(np.int32)
  keys = rng.standard_normal((args.num_keys, args.dim), dtype=np.float32)
  values = rng.standard_normal((args.num_keys, 4, 4, args.value_channels), dtype=np.float32)
  flat = bk.make_bank(keys, values, classes, args.num_classes)
  del values
  batches = [int(b) for b in args.batches.split(',')]
  data = {}
  for batch in batches:
    qc = rng.choice(args.num_classes, size=(batch, 8, 16), p=sizes / sizes.sum()).astype(np.int32)
    q = rng.standard_normal((batch, 8, 16, args.dim), dtype=np.float32)
    # near queries: a random key of the query's class + N(0, 1) noise
    offs = np.cumsum(sizes) - sizes
    pick = offs[qc] + (rng.random(qc.shape) * sizes[qc]).astype(np.int64)
    near = keys[pick] + rng.standard_normal(q.shape, dtype=np.float32)
    data[batch] = (jnp.asarray(q), jnp.asarray(qc), jnp.asarray(near))
  del keys
  exact: dict = {}
  ms: dict = {}
  for kind in args.indices.split(','):
    spec = bk.IndexSpec(kind, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                        ef_search=args.ef_search)
    t0 = time.perf_counter()
    bank = bk.with_index(flat, spec)
    build_dev = time.perf_counter() - t0
    bank.host.faiss_indices()
    build = time.perf_counter() - t0
    params = ({} if kind == 'flat' else dict(nlist=args.nlist, nprobe=args.nprobe) if kind == 'ivf'
              else dict(hnsw_m=args.hnsw_m, ef_search=args.ef_search))
    for batch in batches:
      q, qc, near = data[batch]
      variants = [('faiss', t) for t in threads]
      for backend, nt in ([] if kind == 'hnsw' else [('device', None)]) + variants:
        if nt is not None:
          faiss.omp_set_num_threads(nt or default_threads)
        t0 = time.perf_counter()
        fn = _search_fn(backend).lower(bank, q, qc).compile()
        _, ids = fn(bank, q, qc)  # warm-up run (FAISS: builds the indices)
        ids = np.asarray(ids)
        warm = time.perf_counter() - t0
        med, runs = timed(fn, (bank, q, qc), args.budget_s)
        if kind == 'flat' and (batch, 'ids') not in exact:
          exact[(batch, 'ids')] = ids
          exact[(batch, 'near')] = np.asarray(fn(bank, near, qc)[1])
        recall = float((ids == exact[(batch, 'ids')]).mean())
        recall_near = float((np.asarray(fn(bank, near, qc)[1]) == exact[(batch, 'near')]).mean())
        ms[(kind, backend, nt, batch)] = 1e3 * med / batch
        emit(name='retrieval_ms_per_input', value=round(1e3 * med / batch, 3), unit='ms',
             backend=backend, faiss_threads=None if nt is None else (nt or default_threads),
             index=kind, **params, batch=batch, recall_at_1=round(recall, 4),
             recall_at_1_near=round(recall_near, 4), runs=runs, warmup_s=round(warm, 1),
             faiss_on_gpu=bank.host.faiss_on_gpu if backend == 'faiss' else None,
             loadavg=round(os.getloadavg()[0], 2), **common)
      faiss.omp_set_num_threads(default_threads)
      if kind == 'flat':
        same = bool(np.array_equal(*[np.asarray(_search_fn(b)(bank, q, qc)[1])
                                     for b in ('device', 'faiss')]))
        for t in threads:
          emit(name='retrieval_ratio_faiss_over_device', index='flat', batch=batch,
               faiss_threads=t or default_threads,
               value=round(ms[('flat', 'faiss', t, batch)] / ms[('flat', 'device', None, batch)], 3),
               unit='x', same_neighbours=same, **common)
    emit(name='index_build_s', index=kind, **params, value=round(build, 1), unit='s',
         device_part_s=round(build_dev, 1),
         note='with_index (IVF: k-means per class + the device lists) then the FAISS indices',
         **common)
    del bank
  return ms


def bench_route(config_path: str, repeats: int) -> dict:
  """The cheapest route (the first exit) of the config at batch 1: random weights, jitted."""
  from fiancee_jax import config as cfg  # noqa: PLC0415
  from fiancee_jax import registry  # noqa: PLC0415
  from fiancee_jax.core import pipeline as pl  # noqa: PLC0415
  from fiancee_jax.metrics import macs  # noqa: PLC0415

  c = cfg.load(config_path)
  bb = registry.get(c)
  gen, br = bb.generator(), bb.branches(use_bank=True)
  d = c.data
  rng = np.random.default_rng(0)
  seg = jax.nn.one_hot(jnp.asarray(rng.integers(0, d.num_classes, (1, d.height, d.width))),
                       d.num_classes)
  z = jnp.asarray(rng.standard_normal((1, c.model.z_dim)), jnp.float32)
  g_vars = jax.jit(gen.init)({'params': jax.random.PRNGKey(0)}, seg, z)
  b_vars = jax.jit(functools.partial(pl.init_branches, bb, br))(jax.random.PRNGKey(1))
  s = bb.bank_shapes()
  n = 8 * s['num_classes']
  bank = bk.make_bank(rng.standard_normal((n, s['key_dim']), dtype=np.float32),
                      rng.standard_normal((n, *s['value_shape']), dtype=np.float32),
                      np.repeat(np.arange(s['num_classes']), 8), s['num_classes'])
  params = {'generator': g_vars, 'branches': b_vars, 'predictor': None, 'bank': bank}
  p = pl.Pipeline(bb, gen, br, None, params, np.zeros(len(bb.exits) + 1), bb.exits)
  route = bb.exit_routes(float(c.branches.sf), True)[0]
  gmacs = round(macs.count_macs(route.fn, *route.args) / 1e9, 3)
  t0 = time.perf_counter()
  fn = jax.jit(pl.route_fns(p)[0]).lower(params, seg, z).compile()
  jax.block_until_ready(fn(params, seg, z))
  compile_s = time.perf_counter() - t0
  med = statistics.median(_repeat(fn, (params, seg, z), repeats))
  return dict(route=route.name, gmacs=gmacs, ms=1e3 * med, runs=repeats,
              compile_s=round(compile_s, 1), backend=bank.host.backend_used,
              resolution=[d.height, d.width], sf=float(c.branches.sf))


def _repeat(fn, args, n):
  out = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - t)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true',
                 help='35 x 800 keys, batches 1,8, 2 s per setting, the tiny route config')
  p.add_argument('--num-keys', type=int, default=122_100)
  p.add_argument('--dim', type=int, default=1024)
  p.add_argument('--num-classes', type=int, default=35)
  p.add_argument('--max-per-class', type=int, default=5000)
  p.add_argument('--value-channels', type=int, default=8)
  p.add_argument('--batches', default='1,64')
  p.add_argument('--budget-s', type=float, default=15.0, help='timing budget per setting')
  p.add_argument('--indices', default='flat,ivf,hnsw')
  p.add_argument('--nlist', type=int, default=64)
  p.add_argument('--nprobe', type=int, default=8)
  p.add_argument('--hnsw-m', type=int, default=32)
  p.add_argument('--ef-search', type=int, default=64)
  p.add_argument('--route-config', default='configs/oasis_cityscapes.py',
                 help="'' to skip the route")
  p.add_argument('--route-repeats', type=int, default=5)
  p.add_argument('--faiss-threads', default='0,1',
                 help='FAISS OpenMP thread counts to time (0: its default, all cores)')
  args = p.parse_args()
  if args.quick:
    args.num_keys, args.max_per_class, args.batches = 35 * 800, 800, '1,8'
    args.budget_s, args.route_repeats = 2.0, 3
    if args.route_config == 'configs/oasis_cityscapes.py':
      args.route_config = 'configs/oasis_cityscapes.py:tiny'
  if not args.indices.startswith('flat'):
    args.indices = 'flat,' + args.indices  # recall needs the exact neighbours first

  m = machine()
  emit(name='machine', **m, loadavg=round(os.getloadavg()[0], 2))
  common = dict(num_keys=args.num_keys, dim=args.dim, device=f"{m['platform']}:{m['cpu']}")
  ms = bench_retrieval(args, np.random.default_rng(0), common)
  resolved = bk.resolve_backend('auto')
  t0 = int(args.faiss_threads.split(',')[0])
  for batch in [int(b) for b in args.batches.split(',')]:
    flat = {k: v for k, v in ms.items() if k[0] == 'flat' and k[3] == batch}
    best = min(flat, key=flat.get)
    faster = 'device' if flat[('flat', 'device', None, batch)] < flat[('flat', 'faiss', t0, batch)] \
        else 'faiss'
    emit(name='retrieval_auto_backend', batch=batch, resolved=resolved,
         faster_here=faster, faiss_threads=t0 or m['faiss_threads'], agrees=resolved == faster,
         fastest_here=dict(backend=best[1], faiss_threads=best[2]), platform=m['platform'],
         index='flat', **common)
  b1 = min(int(b) for b in args.batches.split(','))
  if args.route_config:
    r = bench_route(args.route_config, args.route_repeats)
    emit(name='route_ms', value=round(r['ms'], 1), unit='ms', batch=1, config=args.route_config,
         **{k: v for k, v in r.items() if k != 'ms'}, loadavg=round(os.getloadavg()[0], 2),
         note="its own bank is 8 keys per class: the search in it is negligible", **common)
    for (kind, backend, nt, batch), v in sorted(ms.items(), key=str):
      if batch != b1:
        continue
      emit(name='retrieval_over_route', value=round(v / r['ms'], 4), unit='x', batch=batch,
           index=kind, backend=backend, faiss_threads=None if nt is None else nt or m['faiss_threads'],
           auto=backend == resolved and kind == 'flat' and nt in (None, t0),
           retrieval_ms=round(v, 2), route_ms=round(r['ms'], 1),
           share_of_route_plus_retrieval=round(v / (v + r['ms']), 4), config=args.route_config,
           **common)
  emit(name='paper_retrieval_ms_per_input', value=PAPER_MS_PER_INPUT, unit='ms', backend='faiss',
       batch=1, share_of_route=PAPER_SHARE_OF_ROUTE, device='gpu:Tesla P40 (paper, Sec. S1.1.1)')


if __name__ == '__main__':
  main()

"""Batched routed inference over many inputs (`infer.py --labels DIR | --split S --out DIR`).

Each input is read by the adapter's `infer_inputs().from_flags` (the reader of one `infer.py`
input: `{'label': path}` for a file of --labels, `{'index': i, 'split': S}` for an example
of a data split), in chunks of `chunk` inputs, so memory stays bounded whatever the number of
inputs; a chunk is routed by `Engine.routed_batch` (one compiled prefix + predictor + choice
call, then per (route, bucket) a call continuing from the prefix) while the previous chunk's
images are written. Output, in --out:

  <name>.png      the routed image of each input (temporary file + rename: never half written)
  results.jsonl   one JSON line per input: name, input, status ('ok' | 'error'), exit, route,
                  predicted LPIPS (of the chosen exit, and of every exit), GMACs, image path;
                  an input that cannot be read gets an 'error' line (and a console line) and
                  is skipped, the others go on. A line is appended (one write, flushed) only
                  after its image is in place.
  summary.json    counts per exit, mean GMACs (and share of the backbone), mean predicted
                  LPIPS, errors, throughput, time to first image, the rule or the budget.

Resumable: a rerun skips every input that already has an 'ok' line (an input whose line is an
error is tried again; the summary counts the latest line of each input). Routing: the
threshold rule (`infer.rules`) or, with `budget`, `routing.budget_exits` per chunk (each chunk's
mean GMACs <= budget, so the run's mean is too).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Iterator, Sequence

import numpy as np

from fiancee_jax import io_utils
from fiancee_jax.core.interface import Backbone
from fiancee_jax.infer import engine as engine_lib
from fiancee_jax.infer import inputs as inputs_lib
from fiancee_jax.infer import rules
from fiancee_jax.infer.inputs import InferError

RESULTS = 'results.jsonl'
SUMMARY = 'summary.json'
IMAGE_SUFFIXES = ('.png',)


@dataclasses.dataclass(frozen=True)
class Item:
  """One input of a batch run: its name (the output image's stem, the resume key), what the
  JSON line calls it, and the `from_flags` flags that read it."""
  name: str
  input: str
  flags: dict


def list_items(backbone: Backbone, workdir: str, *, labels: str | None = None,
               split: str | None = None, noise_seed: int = 0) -> list[Item]:
  """The inputs of a run: every `*.png` file of `labels` (sorted by name), or every example
  of the data split `split`; one noise seed for all."""
  seed = int(noise_seed)
  if (labels is None) == (split is None):
    raise InferError('give exactly one of --labels (a folder of label-id PNGs) or --split '
                     '(a prepared data split) with --out')
  if labels is not None:
    if not os.path.isdir(labels):
      raise InferError(f'--labels={labels!r}: not a folder; expected a folder of label-id PNGs')
    files = sorted(f for f in os.listdir(labels) if f.lower().endswith(IMAGE_SUFFIXES)
                   and not f.startswith('.') and os.path.isfile(os.path.join(labels, f)))
    if not files:
      raise InferError(f'--labels={labels!r}: no *.png file in this folder')
    items = [Item(f'{inputs_lib.stem(f)}_s{seed}', f,
                  {'label': os.path.join(labels, f), 'noise_seed': seed}) for f in files]
    names = [it.name for it in items]
    if len(set(names)) != len(names):
      dup = next(n for n in names if names.count(n) > 1)
      raise InferError(f'--labels={labels!r}: two files give the output name {dup!r}')
    return items
  n = len(inputs_lib._source(backbone.config, workdir, split))  # noqa: SLF001
  return [Item(f'{split}{i}_s{seed}', f'{split}[{i}]',
               {'index': i, 'split': split, 'noise_seed': seed}) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# results.jsonl


def read_results(path: str) -> dict[str, dict]:
  """The latest line of each input in results.jsonl ({} when absent). A last line cut short
  by a kill (no newline) is removed from the file, so appending goes on from a whole line."""
  if not os.path.exists(path):
    return {}
  with open(path, 'rb') as f:
    data = f.read()
  if data and not data.endswith(b'\n'):
    keep = data.rfind(b'\n') + 1
    with open(path, 'r+b') as f:
      f.truncate(keep)
    data = data[:keep]
  out = {}
  for line in data.decode().splitlines():
    if line.strip():
      row = json.loads(line)
      out[row['name']] = row
  return out


def _append(f: Any, row: dict) -> None:
  from fiancee_jax.infer import report  # noqa: PLC0415
  f.write((json.dumps(report.jsonable(row)) + '\n').encode())  # one write per line
  f.flush()


# ---------------------------------------------------------------------------------------------
# The run.


def _read(backbone: Backbone, workdir: str, items: Sequence[Item], shapes: list,
          log: Any) -> tuple[list[tuple[Item, Any]], list[dict]]:
  """(readable (item, request) pairs, error rows) of one chunk. `shapes`: the route input
  shapes of the run (set by the first readable input when empty)."""
  reader = backbone.infer_inputs()
  ok, errors = [], []
  for it in items:
    try:
      try:
        req = reader.from_flags(workdir, dict(it.flags))
      except InferError as e:
        if _not_per_input(it, e):
          raise InferError(f'batched inference over {it.input!r}: not supported for this '
                           f'backbone ({backbone.config.name}): {e}') from None
        raise
      got = [tuple(np.shape(x)) for x in req.inputs]
      if not shapes:
        shapes.extend(got)
      if got != list(shapes):
        raise InferError(f'{it.input}: route inputs of shapes {got}; expected {list(shapes)}')
    except InferError as e:
      if 'not supported for this backbone' in str(e):
        raise
      errors.append({'name': it.name, 'input': it.input, 'status': 'error', 'error': str(e)})
      print(f'[batch] skipped {it.input}: {e}', file=log, flush=True)
      continue
    ok.append((it, req))
  return ok, errors


def _not_per_input(item: Item, error: InferError) -> bool:
  """An error that does not name this input's file or index: the backbone does not take the
  flag at all (head avatars and --labels), not a bad file."""
  msg = str(error)
  marks = [repr(v) for v in (item.flags.get('label'),) if v is not None]
  marks += [f'--index={item.flags["index"]}'] if 'index' in item.flags else []
  return not any(m in msg for m in marks)


def _chunks(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
  for i in range(0, len(items), size):
    yield items[i:i + size]


def run(backbone: Backbone, workdir: str, out_dir: str, *, labels: str | None = None,
        split: str | None = None, noise_seed: int = 0, threshold: float = 0.1,
        rule: rules.Rule | None = None, budget: float | None = None, chunk: int | None = None,
        engine: engine_lib.Engine | None = None, started: float | None = None,
        warm: bool = True, log: Any = None) -> dict[str, Any]:
  """Route every input of `labels` / `split` into `out_dir` (see the module doc); returns
  the summary (also `out_dir/summary.json`). `budget` (mean GMACs per input) replaces the
  threshold rule. `chunk`: inputs per routed batch (default the largest bucket size).
  `started`: the process start (`time.time()` clock) for time_to_first_image_s."""
  log = log or sys.stdout
  t_start = time.time()
  items = list_items(backbone, workdir, labels=labels, split=split, noise_seed=noise_seed)
  config = backbone.config
  size = int(chunk or max(config.routing.bucket_sizes))
  if size < 1:
    raise InferError(f'--chunk={chunk}: expected a positive number of inputs per batch')
  os.makedirs(out_dir, exist_ok=True)
  results_path = os.path.join(out_dir, RESULTS)
  done = {n for n, r in read_results(results_path).items() if r.get('status') == 'ok'}
  todo = [it for it in items if it.name not in done]
  print(f'[batch] {len(items)} inputs, {len(items) - len(todo)} already in {results_path}, '
        f'{len(todo)} to route in chunks of {size}', file=log, flush=True)
  t0 = time.perf_counter()
  if engine is None:
    engine = engine_lib.Engine(engine_lib.load(backbone, workdir))
  load_s = time.perf_counter() - t0
  costs = engine.costs
  if budget is not None:
    b = float(budget)
    if not math.isfinite(b) or b < float(costs.min()):
      raise InferError(f'--budget={budget!r} GMACs: expected a mean budget per input >= '
                       f'{float(costs.min()):.4g} (the cheapest route; the backbone costs '
                       f'{float(costs[-1]):.4g})')
    rule_info: dict[str, Any] = {'budget_gmacs': b}
    offset = 0.0
  else:
    rule = rules.calibrate(rule or rules.check(default_alpha=float(config.routing.alpha)),
                           backbone, workdir, engine.pipeline)
    rule_info = {'threshold': threshold, **rule.info(threshold, costs)}
    offset = rule_info['offset']
    offset = offset if math.isfinite(offset) else (1e9 if offset > 0 else -1e9)
  shapes: list = []
  warm_s = 0.0
  names = engine.pipeline.route_names
  first_image = None
  n_ok = n_err = 0
  t_route = time.perf_counter()

  def finish(f, pending):
    nonlocal first_image, n_ok
    pairs, images, exits, pred = pending
    images = np.asarray(images)  # the host needs the pixels: the chunk's one wait
    for (it, req), img, e, p in zip(pairs, images, exits, pred):
      path = os.path.join(out_dir, f'{it.name}.png')
      engine_lib.write_image(path, img)
      e = int(e)
      _append(f, {'name': it.name, 'input': it.input, 'status': 'ok',
                  'exit': int(engine.exits[e]) if e < len(engine.exits) else 'backbone',
                  'route': e, 'pred_lpips_chosen': float(p[e]) if e < len(p) else 0.0,
                  'pred_lpips': dict(zip(names[:-1], (float(v) for v in p))),
                  'gmacs': float(costs[e]), 'image': path, **req.info})
      n_ok += 1
      if first_image is None:
        first_image = time.time()

  with open(results_path, 'ab') as f:
    pending = None
    for part in _chunks(todo, size):
      pairs, errors = _read(backbone, workdir, part, shapes, log)
      for row in errors:
        _append(f, row)
      n_err += len(errors)
      launched = None
      if pairs and warm and not warm_s:   # compiled for the shapes the readers give
        # the choice call; each route compiles when a chunk first needs it at a bucket size
        # (warming all of them, 5 routes x 7 buckets on the demo config, would put minutes
        # of compiles before the first image)
        warm_s = engine.warm(batch=size, like=pairs[0][1].inputs, routes=False)
      if pairs:
        x = tuple(np.concatenate([req.inputs[j] for _, req in pairs] +
                                 [pairs[-1][1].inputs[j]] * (size - len(pairs)))
                  for j in range(len(shapes)))   # padded to the chunk: one compiled shape
        images, exits, pred = engine.routed_batch(x, threshold, offset, budget=budget,
                                                  num_valid=len(pairs), with_pred=True,
                                                  on_host=True)
        launched = (pairs, images, exits, pred)
      if pending is not None:
        finish(f, pending)   # the previous chunk is written while this one runs
      pending = launched
      _progress(log, n_ok + n_err + (len(pending[0]) if pending else 0), len(todo),
                time.perf_counter() - t_route)
    if pending is not None:
      finish(f, pending)
  wall = time.perf_counter() - t_route
  summary = summarize(read_results(results_path), costs, names)
  summary.update(rule_info, this_run={
      'routed': n_ok, 'errors': n_err, 'skipped_already_done': len(items) - len(todo),
      'wall_s': wall, 'images_per_s': n_ok / wall if wall > 0 and n_ok else 0.0,
      'load_s': load_s, 'warm_s': warm_s,
      'time_to_first_image_s': None if first_image is None else
      first_image - (started if started is not None else t_start)},
      chunk=size, device=engine_lib.device_name(), num_devices=engine.num_devices,
      results=results_path)
  from fiancee_jax.infer import report  # noqa: PLC0415
  io_utils.atomic_write(os.path.join(out_dir, SUMMARY),
                        json.dumps(report.jsonable(summary), indent=1))
  return summary


def _progress(log: Any, done: int, total: int, seconds: float) -> None:
  rate = done / seconds if seconds > 0 else 0.0
  eta = (total - done) / rate if rate > 0 else math.nan
  print(f'[batch] {done}/{total} ({100 * done / max(total, 1):.0f}%) {rate:.1f} inputs/s, '
        f'eta {eta:.0f} s', file=log, flush=True)


def summarize(rows: dict[str, dict], costs: np.ndarray, route_names: Sequence[str]
              ) -> dict[str, Any]:
  """Totals over the latest line of every input."""
  ok = [r for r in rows.values() if r.get('status') == 'ok']
  gm = np.array([r['gmacs'] for r in ok], np.float64)
  counts = {n: 0 for n in route_names}
  for r in ok:
    counts[route_names[int(r['route'])]] += 1
  return {'num_inputs': len(rows), 'num_ok': len(ok), 'num_errors': len(rows) - len(ok),
          'errors': [{'input': r['input'], 'error': r['error']} for r in rows.values()
                     if r.get('status') != 'ok'][:20],
          'exit_counts': counts,
          'mean_gmacs': float(gm.mean()) if ok else math.nan,
          'backbone_gmacs': float(costs[-1]),
          'gmacs_share': float(gm.mean() / costs[-1]) if ok else math.nan,
          'mean_pred_lpips_chosen': float(np.mean([r['pred_lpips_chosen'] for r in ok]))
          if ok else math.nan}

"""Predictor stage (Sec. 3.2, S1.1.2): learn, per input, the LPIPS every exit would reach.

Datasets (cached under `<workdir>/predictor/dataset_<split>.npz`, written atomically; a cache
whose fingerprint (config, data indices, noises, stage checkpoints) differs is rebuilt):
  train        config.predictor.num_train maps of the 'train' split x the K fixed noises
               (config.predictor.num_noises; the bank's noises when build_bank saved them)
  validation   held-out maps ('validation' split) with the same K noises (Table S3)
  calibration  the other part of the 'validation' maps (routing.calibration_fraction), each
               with a fresh noise: never seen in training, exchangeable with `test`, so the
               conformal offset calibrated on it holds on `test` (routing.conformal_offset)
  test         'test' split maps with fresh noises (Table S4); the sweep runs on it
Every row holds the predictor input (feats['block1'], the map the bank keys come from), the
targets LPIPS(exit_k image, backbone image) for all exits (one jitted pass per batch:
`fiancee.all_images` + one VGG pass over backbone and exits together), the map index and z.

Head avatars (Sec. 4.2, S1.2): a row is a (source frame, driver frame) pair of a split, the
driver of another identity where the split has several (cross-reenactment, as at inference);
its input is the driver's motion key (3 angles ++ expression, the bank key), its targets the
LPIPS of every exit vs the backbone image, all exits in one jitted pass
(`fiancee_heads.all_images` retrieves the frame from the source identity's bank). The sets:
  train        predictor.num_train source frames spread over the 'train' split x K =
               predictor.num_noises drivers each (drawn from the split, fixed seed)
  validation / calibration
               the predictor.num_validation 'validation' sources, split as above (K drivers each)
  test         predictor.num_test 'test' sources x K drivers

Training: MSE + SGD lr 0.01 with a cosine schedule (OASIS) or MAE + AdamW(0.05, 0.999, wd
1e-2) cosine (head avatars, S1.2.2), data parallel like every stage (`train.parallel`).
Report: relative error per exit = mean|pred - true| / mean(true) on validation and test
(Tables S3 / S4 / S6 give it in %).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fiancee_jax import config as cfg
from fiancee_jax.core import routing
from fiancee_jax.io_utils import atomic_open, atomic_write
from fiancee_jax.metrics import lpips as lpips_lib
from fiancee_jax.models import predictor as predictor_lib
from fiancee_jax.train import checkpoint, parallel
from fiancee_jax.train import logging as tlog

STAGE = 'predictor'
SPLITS = ('train', 'validation', 'calibration', 'test')
PyTree = Any


# ---------------------------------------------------------------------------------------------
# Paths, noises, rows.


def stage_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), STAGE)


def fixed_noises(config: ml_collections.ConfigDict, workdir: str, num: int) -> np.ndarray:
  """The K fixed noises (K, z_dim): the bank's (`<workdir>/bank/noises.npy`, saved by
  build_bank.py) when it holds at least K, else drawn from config.seed (deterministic)."""
  z_dim = config.model.z_dim
  path = os.path.join(os.path.abspath(workdir), 'bank', 'noises.npy')
  if os.path.exists(path):
    saved = np.load(path)
    if saved.ndim == 2 and saved.shape[1] == z_dim and saved.shape[0] >= num:
      return np.asarray(saved[:num], np.float32)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x5EED)
  return np.asarray(jax.random.normal(key, (num, z_dim)), np.float32)


def fresh_noises(config: ml_collections.ConfigDict, split: str, num: int) -> np.ndarray:
  """New noises (num, z_dim) for the calibration / test rows (never the training ones)."""
  tag = {'calibration': 101, 'test': 102}[split]
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), tag)
  return np.asarray(jax.random.normal(key, (num, config.model.z_dim)), np.float32)


def split_rows(config: ml_collections.ConfigDict, workdir: str, split: str
               ) -> tuple[str, np.ndarray, np.ndarray]:
  """(data split, map index per row, z per row) of a predictor dataset split."""
  p = config.predictor
  k = p.num_noises
  noises = fixed_noises(config, workdir, k)
  if split == 'train':
    maps = np.repeat(np.arange(p.num_train), k)
    return 'train', maps, np.tile(noises, (p.num_train, 1))
  if split in ('validation', 'calibration'):
    cal, val = routing.calibration_split(p.num_validation, config.routing.calibration_fraction,
                                         seed=config.seed)
    if split == 'validation':
      return 'validation', val, noises[np.arange(len(val)) % k]
    return 'validation', cal, fresh_noises(config, 'calibration', len(cal))
  if split == 'test':
    return 'test', np.arange(p.num_test), fresh_noises(config, 'test', p.num_test)
  raise ValueError(f'predictor split {split!r}: expected one of {SPLITS}')


def load_labels(config: ml_collections.ConfigDict, workdir: str, data_split: str,
                indices: np.ndarray) -> np.ndarray:
  """Label maps (len(unique), H, W) int32 of `indices` of a data split (a clear error when
  the split has fewer maps than the predictor config asks for)."""
  from fiancee_jax import data  # noqa: PLC0415 (heavy: tfds)
  src = data.source(config.data, data_split, cfg.data_dir(config, workdir))
  need = int(indices.max()) + 1 if len(indices) else 0
  if need > len(src):
    raise ValueError(f'config.predictor asks for {need} maps of the {data_split!r} split, which '
                     f'has {len(src)}: lower predictor.num_* or raise data.num_*')
  return np.stack([np.asarray(src[int(i)]['label'], np.int32) for i in indices])


# ---------------------------------------------------------------------------------------------
# Targets: LPIPS of every exit against the backbone, one jitted pass.


_TARGET_CACHE: dict[int, tuple[Any, Any]] = {}


def _target_fn(pipeline: Any):
  """Jitted (params, lp_params, *row inputs) -> (predictor inputs, LPIPS (B, E)), cached for
  the latest pipeline. OASIS rows: (labels, z); head-avatar rows: (source, driver uint8,
  source identity)."""
  hit = _TARGET_CACHE.get(id(pipeline))
  if hit is not None and hit[0] is pipeline:
    return hit[1]
  from fiancee_jax import fiancee, fiancee_heads  # noqa: PLC0415

  def lpips_of(lp_params, images):
    exits = jnp.stack([images[k] for k in pipeline.exits])
    return lpips_lib.to_reference(lp_params, images['backbone'], exits).T

  if pipeline.config.backbone == 'megaportraits':
    def fn(params, lp_params, source, driver, identity):
      to_pm1 = lambda x: x.astype(jnp.float32) / 127.5 - 1.0  # noqa: E731
      images = fiancee_heads.all_images(pipeline, params, to_pm1(source), to_pm1(driver),
                                        identity)
      return images['motion'], lpips_of(lp_params, images)
  else:
    num_classes = pipeline.config.data.num_classes

    def fn(params, lp_params, labels, z):
      seg = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
      _, feats = fiancee.prefix(pipeline, params, seg, z)
      return feats['block1'], lpips_of(lp_params, fiancee.all_images(pipeline, params, seg, z))
  _TARGET_CACHE.clear()
  _TARGET_CACHE[id(pipeline)] = (pipeline, jax.jit(fn))
  return _TARGET_CACHE[id(pipeline)][1]


def compute_rows(pipeline: Any, params: PyTree, lp_params: PyTree,
                 inputs: Sequence[np.ndarray], batch_size: int, name: str = 'dataset'
                 ) -> dict[str, np.ndarray]:
  """Predictor inputs and targets for rows: `inputs` = per-row arrays of equal length N
  (OASIS: labels (N, H, W) ids, z (N, z_dim); heads: source, driver (N, H, W, 3) uint8,
  source identity (N,)) -> {'feats': (N, ...), 'targets': (N, E)}. Batches are padded to
  `batch_size` (one compile)."""
  fn = _target_fn(pipeline)
  n = len(inputs[0])
  feats, targets = [], []
  t0 = time.perf_counter()
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
    f, t = fn(params, lp_params, *(x[pad] for x in inputs))
    feats.append(np.asarray(f)[:len(idx)])
    targets.append(np.asarray(t)[:len(idx)])
    done = idx[-1] + 1
    if done == n or (start // batch_size) % 10 == 0:
      rate = done / max(time.perf_counter() - t0, 1e-9)
      print(f'[{STAGE}] {name}: {done}/{n} rows ({rate:.1f} rows/s)', flush=True)
  return {'feats': np.concatenate(feats), 'targets': np.concatenate(targets).astype(np.float32)}


def _fingerprint(config, workdir, split, *arrays: np.ndarray) -> str:
  """What a cached split was made from: config, rows (the caller's arrays, hashed with their
  dtype), the stage checkpoints and the bank manifest(s) (OASIS: bank/manifest.json; head
  avatars: bank/<identity>/manifest.json)."""
  h = hashlib.sha256()
  h.update(cfg.config_hash(config, ('model', 'branches', 'data', 'bank')).encode())
  h.update(split.encode())
  for a in arrays:
    h.update(np.ascontiguousarray(a).tobytes())
  for stage in ('backbone', 'branches'):  # rows depend on the trained weights
    steps = [str(s) for s in checkpoint.finished_steps(workdir, stage)]  # not orbax tmp dirs
    h.update(f'{stage}:{steps[-1:]}'.encode())
  bank = os.path.join(os.path.abspath(workdir), 'bank')
  manifests = [os.path.join(bank, 'manifest.json')]
  if not os.path.exists(manifests[0]) and os.path.isdir(bank):
    manifests = sorted(os.path.join(bank, d, 'manifest.json') for d in os.listdir(bank))
  for m in manifests:
    if os.path.exists(m):
      with open(m, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()[:20]


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  with atomic_open(path) as f:
    np.savez(f, **arrays)


def dataset(config: ml_collections.ConfigDict, workdir: str, split: str, pipeline: Any = None,
            lp_params: PyTree = None, batch_size: int | None = None) -> dict[str, np.ndarray]:
  """Rows of a predictor split: {'feats', 'targets', 'maps', 'z', 'data_split'} (head
  avatars: 'sources', 'drivers' instead of 'maps', 'z'); read from the cache when it was made
  from the same config, data, noises and checkpoints, else computed (needs `pipeline`) and
  cached."""
  if config.backbone == 'megaportraits':
    return heads_dataset(config, workdir, split, pipeline, lp_params, batch_size)
  data_split, maps, z = split_rows(config, workdir, split)
  fp = _fingerprint(config, workdir, split, maps.astype(np.int64), z.astype(np.float32))
  path = os.path.join(stage_dir(workdir), f'dataset_{split}.npz')
  if os.path.exists(path):
    try:
      with np.load(path) as f:
        if str(f['fingerprint']) == fp:
          return {k: f[k] for k in ('feats', 'targets', 'maps', 'z')} | {'data_split': data_split}
    except (OSError, KeyError, ValueError):
      pass  # unreadable or old cache: rebuilt below
  if pipeline is None:
    from fiancee_jax import fiancee  # noqa: PLC0415
    pipeline = fiancee.load_pipeline(config, workdir, stages=('backbone', 'bank', 'branches'))
  if lp_params is None:
    lp_params = lpips_lib.load_params()
  uniq, inv = np.unique(maps, return_inverse=True)
  labels = load_labels(config, workdir, data_split, uniq)[inv]
  bs = batch_size or min(max(config.predictor.batch_size, 1), 32)
  rows = compute_rows(pipeline, pipeline.params, lp_params, (labels, z), bs, name=split)
  out = {**rows, 'maps': maps.astype(np.int32), 'z': z.astype(np.float32)}
  _save_npz(path, {**out, 'fingerprint': np.array(fp)})
  return out | {'data_split': data_split}


# ---------------------------------------------------------------------------------------------
# Head avatars: (source, driver) rows.


def heads_split_rows(config: ml_collections.ConfigDict, workdir: str, split: str
                     ) -> tuple[str, np.ndarray, np.ndarray]:
  """(data split, source example per row, driver example per row) of a head-avatar predictor
  split: sources spread evenly over the data split, K = predictor.num_noises drivers each
  drawn (fixed seed) from the split's frames of other identities (any frame when the split
  has one identity)."""
  from fiancee_jax import data as fdata  # noqa: PLC0415 (heavy: tfds)
  p = config.predictor
  if split == 'train':
    data_split, num, pick = 'train', p.num_train, None
  elif split in ('validation', 'calibration'):
    cal, val = routing.calibration_split(p.num_validation, config.routing.calibration_fraction,
                                         seed=config.seed)
    data_split, num, pick = 'validation', p.num_validation, (val if split == 'validation'
                                                             else cal)
  elif split == 'test':
    data_split, num, pick = 'test', p.num_test, None
  else:
    raise ValueError(f'predictor split {split!r}: expected one of {SPLITS}')
  src = fdata.source(config.data, data_split, cfg.data_dir(config, workdir))
  n = len(src)
  if num > n:
    raise ValueError(f'config.predictor asks for {num} source frames of the {data_split!r} '
                     f'split, which has {n}: lower predictor.num_* or raise the data size')
  sources = np.round(np.linspace(0, n - 1, num)).astype(np.int64)
  if pick is not None:
    sources = sources[pick]
  ids = np.array([int(src[i]['identity']) for i in range(n)])
  k = int(p.num_noises)
  drivers = []
  for s in sources:
    others = np.flatnonzero(ids != ids[s])
    others = others if len(others) else np.arange(n)
    rng = np.random.default_rng([config.seed, 29, SPLITS.index(split), int(s)])
    drivers.append(rng.choice(others, k, replace=len(others) < k))
  return data_split, np.repeat(sources, k), np.concatenate(drivers).astype(np.int64)


def heads_dataset(config: ml_collections.ConfigDict, workdir: str, split: str,
                  pipeline: Any = None, lp_params: PyTree = None,
                  batch_size: int | None = None) -> dict[str, np.ndarray]:
  """Rows of a head-avatar predictor split: {'feats' (N, 3 + expr_dim) driver motion keys,
  'targets' (N, E), 'sources', 'drivers' (example indices), 'data_split'}; cached like
  `dataset`."""
  from fiancee_jax import data as fdata  # noqa: PLC0415 (heavy: tfds)
  data_split, sources, drivers = heads_split_rows(config, workdir, split)
  fp = _fingerprint(config, workdir, split, sources, drivers)
  path = os.path.join(stage_dir(workdir), f'dataset_{split}.npz')
  keys = ('feats', 'targets', 'sources', 'drivers')
  if os.path.exists(path):
    try:
      with np.load(path) as f:
        if str(f['fingerprint']) == fp:
          return {k: f[k] for k in keys} | {'data_split': data_split}
    except (OSError, KeyError, ValueError):
      pass  # unreadable or old cache: rebuilt below
  if pipeline is None:
    from fiancee_jax import fiancee  # noqa: PLC0415
    pipeline = fiancee.load_pipeline(config, workdir, stages=('backbone', 'bank', 'branches'))
  if lp_params is None:
    lp_params = lpips_lib.load_params()
  src = fdata.source(config.data, data_split, cfg.data_dir(config, workdir))
  uniq, inv = np.unique(np.concatenate([sources, drivers]), return_inverse=True)
  frames = [src[int(i)] for i in uniq]
  images = np.stack([np.asarray(f['image'], np.uint8) for f in frames])
  identity = np.array([int(f['identity']) for f in frames], np.int32)
  s_inv, d_inv = inv[:len(sources)], inv[len(sources):]
  bs = batch_size or min(max(config.predictor.batch_size, 1), 32)
  rows = compute_rows(pipeline, pipeline.params, lp_params,
                      (images[s_inv], images[d_inv], identity[s_inv]), bs, name=split)
  out = {**rows, 'sources': sources, 'drivers': drivers}
  _save_npz(path, {**out, 'fingerprint': np.array(fp)})
  return out | {'data_split': data_split}


# ---------------------------------------------------------------------------------------------
# Training.


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """SGD + cosine (OASIS, S1.1.2) or AdamW + cosine (head avatars, S1.2.2)."""
  p = config.predictor
  schedule = optax.cosine_decay_schedule(p.lr, max(int(p.num_steps), 1))
  if p.optimizer == 'sgd_cosine':
    return optax.sgd(schedule)
  if p.optimizer == 'adamw_cosine':  # S1.2.2: AdamW(0.05, 0.999), weight decay 1e-2
    return optax.adamw(schedule, b1=0.05, b2=0.999, weight_decay=1e-2)
  raise ValueError(f"predictor.optimizer={p.optimizer!r}: expected 'sgd_cosine' or "
                   "'adamw_cosine'")


def create_state(config: ml_collections.ConfigDict, feat_shape: Sequence[int],
                 model: Any = None, tx: Any = None) -> dict[str, PyTree]:
  """{'step', 'params', 'opt_state'} (host arrays) for inputs of shape (h, w, C)."""
  model = model or predictor_lib.from_config(config)
  tx = tx or make_optimizer(config)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x9D)
  params = jax.jit(model.init)(key, jnp.zeros((1,) + tuple(feat_shape), jnp.float32))['params']
  return jax.device_get({'step': jnp.zeros((), jnp.int32), 'params': params,
                         'opt_state': tx.init(params)})


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Shape of the predictor input: OASIS (h, w, C) of feats['block1'] (the output of
  ResBlock 1); head avatars (3 + expr_dim,), the driver's motion key."""
  if config.backbone == 'megaportraits':
    return (3 + int(config.model.expr_dim),)
  return (config.data.height // 32, config.data.width // 32, cfg.oasis_widths(config.model.ch)[1])


def restore_params(config: ml_collections.ConfigDict, workdir: str) -> PyTree:
  """Predictor params of the latest predictor checkpoint in `workdir` (for fiancee.py);
  one clear error naming the command when there is none."""
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir, STAGE)):
    raise checkpoint.CheckpointError(
        f'no predictor checkpoint in {workdir}: run `train.py --stage=predictor` first')
  out = checkpoint.restore_latest(workdir, STAGE, create_state(config, input_shape(config)),
                                  config)
  if out is None:
    raise checkpoint.CheckpointError(
        f'no predictor checkpoint in {workdir}: run `train.py --stage=predictor` first')
  return out[0]['params']


def train_step(state: dict[str, PyTree], batch: dict[str, jax.Array], *, model: Any,
               tx: optax.GradientTransformation, loss: str,
               axis_name: str | None = parallel.AXIS) -> tuple[dict[str, PyTree], dict]:
  """One optimiser step on this device's share of the batch (grads pmean-ed over devices)."""
  def loss_of(params):
    pred = model.apply({'params': params}, batch['feats'])
    return predictor_lib.loss_fn(pred, batch['targets'], loss)

  value, grads = jax.value_and_grad(loss_of)(state['params'])
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    value = jax.lax.pmean(value, axis_name)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, {'loss': value}


@functools.lru_cache(maxsize=4)
def _predict_fn(model: Any):
  return jax.jit(lambda params, feats: model.apply({'params': params}, feats))


def predict(model: Any, params: PyTree, feats: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """Predicted LPIPS (N, E) of rows of predictor inputs."""
  fn = _predict_fn(model)
  out = [np.asarray(fn(params, feats[i:i + batch_size])) for i in range(0, len(feats), batch_size)]
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def relative_error(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
  """Per exit: mean |pred - true| / mean true (Tables S3 / S4, as a fraction)."""
  pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
  return np.mean(np.abs(pred - true), axis=0) / np.maximum(np.mean(true, axis=0), 1e-12)


class _Rows:
  """Random-access source of predictor rows for the data Loader."""

  def __init__(self, rows: dict[str, np.ndarray]):
    self.feats, self.targets = rows['feats'], rows['targets']

  def __len__(self) -> int:
    return len(self.targets)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {'feats': self.feats[i], 'targets': self.targets[i]}


def evaluate(config, workdir, model, params, rows_by_split: dict[str, dict]) -> dict[str, Any]:
  """Relative error per exit on each split (+ mean), written to `<workdir>/predictor/eval.json`."""
  exits = [int(k) for k in config.branches.exits]
  out: dict[str, Any] = {'definition': 'mean |pred - true| / mean true, per exit',
                         'exits': exits}
  for split, rows in rows_by_split.items():
    pred = predict(model, params, rows['feats'])
    rel = relative_error(pred, rows['targets'])
    out[split] = {'rel_error': rel.tolist(), 'mean_rel_error': float(rel.mean()),
                  'mae': np.mean(np.abs(pred - rows['targets']), 0).tolist(),
                  'mean_true': np.mean(rows['targets'], 0).tolist(), 'rows': int(len(pred))}
  if jax.process_index() == 0:  # every process computes the same numbers
    atomic_write(os.path.join(stage_dir(workdir), 'eval.json'), json.dumps(out, indent=1))
  return out


def format_eval(ev: dict[str, Any]) -> str:
  """Tables S3 / S4 layout: one line per split, relative error per exit in %."""
  head = ' '.join(f'B{k:<5}' for k in ev['exits'])
  lines = [f'{"split":<12} {head} mean']
  for split in ('validation', 'test', 'calibration', 'train'):
    if split in ev:
      r = ev[split]
      lines.append(f'{split:<12} ' + ' '.join(f'{100 * v:5.1f}%' for v in r['rel_error'])
                   + f' {100 * r["mean_rel_error"]:5.1f}%')
  return '\n'.join(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, PyTree]:
  """`train.py --stage=predictor`: build (or reuse) the datasets, train (or resume) the
  predictor, checkpoint it under `<workdir>/checkpoints/predictor`, print and save the
  relative error per exit on validation and test. Returns the final host state."""
  from fiancee_jax import fiancee  # noqa: PLC0415

  cfg.validate(config)
  p = config.predictor
  pipeline = fiancee.load_pipeline(config, workdir, stages=('backbone', 'bank', 'branches'))
  lp_params = lpips_lib.load_params()
  # Process 0 computes and caches each split's rows; the others then read its cache.
  rows = {s: parallel.chief_first(lambda s=s: dataset(config, workdir, s, pipeline, lp_params),
                                  f'predictor rows {s}') for s in SPLITS}
  model = predictor_lib.from_config(config)
  tx = make_optimizer(config)
  step_fn = functools.partial(train_step, model=model, tx=tx, loss=p.loss)
  dp = parallel.wrap(step_fn, config.parallel)
  parallel.check_batch_size(p.batch_size, dp.num_devices, 'predictor.batch_size')

  from fiancee_jax.data import loader as data_loader  # noqa: PLC0415
  train_src = _Rows(rows['train'])
  if len(train_src) < p.batch_size:
    raise ValueError(f'predictor.batch_size={p.batch_size} exceeds the {len(train_src)} training '
                     'rows (predictor.num_train x predictor.num_noises)')
  ckpt = checkpoint.Checkpointer(workdir, STAGE, config)
  host = create_state(config, rows['train']['feats'].shape[1:], model, tx)
  loader_state = None
  try:
    if ckpt.latest_step() is not None:
      host, meta = ckpt.restore(host)
      loader_state = meta.get('data')
      print(f'[{STAGE}] resumed from {ckpt.directory} at step {int(host["step"])}', flush=True)
    loader = data_loader.Loader(train_src, p.batch_size, seed=config.seed, state=loader_state,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
    it = iter(loader)
    state = dp.put_state(host)
    start = int(host['step'])
    progress = tlog.Progress(p.num_steps, start, max(p.num_steps // 20, 1), name=STAGE)
    for step in range(start + 1, p.num_steps + 1):
      state, metrics = dp(state, dp.put_batch(next(it)))
      if step % progress.log_every == 0 or step == p.num_steps:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(m['loss']):
          raise FloatingPointError(f'[{STAGE}] non-finite loss at step {step}; lower '
                                   'predictor.lr')
        progress.update(step, m)
    host = dp.get_state(state)
    ev = evaluate(config, workdir, model, host['params'],
                  {s: rows[s] for s in ('validation', 'test', 'calibration')})
    print(f'[{STAGE}] relative error per exit ({ev["definition"]}):\n{format_eval(ev)}',
          flush=True)
    if ckpt.latest_step() != int(host['step']):
      ckpt.save(int(host['step']), host, {'data': loader.state(), 'eval': ev})
  finally:
    ckpt.close()
  return host

"""Predictor stage (Sec. 3.2, S1.1.2, S1.2.2): learn, per input, the LPIPS every exit would
reach.

Datasets: `core.predictor_data` (train / validation / calibration / test rows of the
adapter's `PredictorRows`, targets = LPIPS of every exit vs the backbone image, cached under
`<workdir>/predictor/`). Training: MSE + SGD lr 0.01 with a cosine schedule (OASIS, Eq. S2)
or MAE + AdamW(0.05, 0.999, wd 1e-2) cosine (head avatars, S1.2.2) as config.predictor says,
data parallel like every stage (`train.parallel`). Report: relative error per exit = mean
|pred - true| / mean(true) on validation, test and calibration (Tables S3 / S4 / S6 give it
in %), written to `<workdir>/predictor/eval.json`; the checkpoint is
`<workdir>/checkpoints/predictor` ({'step', 'params', 'opt_state'}: `core.stages.
load_predictor` reads its 'params').
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fiancee_jax import workdir as wdir
from fiancee_jax import config as cfg
from fiancee_jax import workdir as wd
from fiancee_jax.core import predictor_data, predictor_model
from fiancee_jax.core import stages
from fiancee_jax.core.interface import Backbone
from fiancee_jax.core.predictor_data import SPLITS, PredictorDataError
from fiancee_jax.io_utils import atomic_write
from fiancee_jax.metrics import lpips as lpips_lib
from fiancee_jax.train import checkpoint, parallel
from fiancee_jax.train import logging as tlog

STAGE = 'predictor'
PyTree = Any


def stage_dir(workdir: str) -> str:
  return wd.predictor_dir(workdir)


# ---------------------------------------------------------------------------------------------
# Training.


def loss_fn(pred: jax.Array, target: jax.Array, kind: str) -> jax.Array:
  """MSE (OASIS, Eq. S2) or MAE (MegaPortraits, S1.2.2) between predicted and true LPIPS."""
  if kind == 'mse':
    return jnp.mean((pred - target) ** 2)
  if kind == 'mae':
    return jnp.mean(jnp.abs(pred - target))
  raise ValueError(f"predictor loss {kind!r}: expected 'mse' or 'mae'")


def make_optimizer(config) -> optax.GradientTransformation:
  """SGD + cosine (OASIS, S1.1.2), AdamW + cosine (head avatars, S1.2.2) or Adam + cosine (the
  demo's); with predictor.target_norm the target stats stay frozen."""
  p = config.predictor
  schedule = optax.cosine_decay_schedule(p.lr, max(int(p.num_steps), 1))
  if p.optimizer == 'sgd_cosine':
    tx = optax.sgd(schedule)
  elif p.optimizer == 'adamw_cosine':  # S1.2.2: AdamW(0.05, 0.999), weight decay 1e-2
    tx = optax.adamw(schedule, b1=0.05, b2=0.999, weight_decay=1e-2)
  elif p.optimizer == 'adam_cosine':
    tx = optax.adam(schedule)
  else:
    raise ValueError(f'predictor.optimizer={p.optimizer!r}: expected one of '
                     f'{cfg.PREDICTOR_OPTIMIZERS}')
  if p.target_norm:
    return optax.multi_transform({'fit': tx, 'frozen': optax.set_to_zero()},
                                 predictor_model.frozen_labels)
  return tx


def input_shape(backbone: Backbone) -> tuple[int, ...]:
  """Shape of one predictor input: the prefix's `pred_in` without the batch axis (OASIS
  (h, w, C) of the block-1 map; head avatars (3 + expr_dim,), the driver's motion key)."""
  return tuple(backbone.predictor_rows().pred_in_shape())


def create_state(backbone: Backbone, feat_shape: Sequence[int], model: Any = None,
                 tx: Any = None, targets: np.ndarray | None = None) -> dict[str, PyTree]:
  """{'step', 'params', 'opt_state'} (host arrays) for inputs of shape `feat_shape`;
  `targets` (N, E): the training rows' LPIPS, whose mean / std a target_norm model keeps."""
  config = backbone.config
  model = model or predictor_model.model(backbone)
  tx = tx or make_optimizer(config)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x9D)
  params = jax.jit(model.init)(key, jnp.zeros((1,) + tuple(feat_shape), jnp.float32))['params']
  if targets is not None and config.predictor.target_norm:
    params = predictor_model.set_target_stats(params, targets)
  return jax.device_get({'step': jnp.zeros((), jnp.int32), 'params': params,
                         'opt_state': tx.init(params)})


def restore_params(backbone: Backbone, workdir: str) -> PyTree:
  """Predictor params of the latest predictor checkpoint in `workdir` (checked against this
  config); one clear error naming the command when there is none."""
  missing = checkpoint.CheckpointError(
      f'no predictor checkpoint in {workdir}: run `train.py --stage=predictor` first')
  if not os.path.isdir(wdir.checkpoint_dir(workdir, STAGE)):
    raise missing
  out = checkpoint.restore_latest(workdir, STAGE, create_state(backbone, input_shape(backbone)),
                                  backbone.config)
  if out is None:
    raise missing
  return out[0]['params']


def train_step(state: dict[str, PyTree], batch: dict[str, jax.Array], *, model: Any,
               tx: optax.GradientTransformation, loss: str,
               axis_name: str | None = parallel.AXIS) -> tuple[dict[str, PyTree], dict]:
  """One optimiser step on this device's share of the batch (grads pmean-ed over devices)."""
  def loss_of(params):
    pred = model.apply({'params': params}, batch['feats'])
    scale = predictor_model.residual_scale(params)   # 1, or each exit's train std
    return loss_fn(pred / scale, batch['targets'] / scale, loss)

  value, grads = jax.value_and_grad(loss_of)(state['params'])
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    value = jax.lax.pmean(value, axis_name)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, {'loss': value}


# ---------------------------------------------------------------------------------------------
# Evaluation (Tables S3 / S4 / S6).


def predict(model: Any, params: PyTree, feats: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """Predicted LPIPS (N, E) of rows of predictor inputs."""
  fn = jax.jit(lambda prm, f: model.apply({'params': prm}, f))
  out = [np.asarray(fn(params, feats[i:i + batch_size])) for i in range(0, len(feats), batch_size)]
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def relative_error(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
  """Per exit: mean |pred - true| / mean true (Tables S3 / S4, as a fraction)."""
  pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
  return np.mean(np.abs(pred - true), axis=0) / np.maximum(np.mean(true, axis=0), 1e-12)


def evaluate(backbone: Backbone, workdir: str, model: Any, params: PyTree,
             rows_by_split: dict[str, dict],
             train_mean: np.ndarray | None = None) -> dict[str, Any]:
  """Relative error per exit on each split (+ mean), written to `<workdir>/predictor/eval.json`;
  with `train_mean` (E,), also the error of predicting it for every row (the floor a predictor
  must beat to have learnt anything from its input)."""
  out: dict[str, Any] = {'definition': 'mean |pred - true| / mean true, per exit',
                         'exits': [int(k) for k in backbone.exits]}
  for split, rows in rows_by_split.items():
    pred = predict(model, params, rows['feats'])
    rel = relative_error(pred, rows['targets'])
    out[split] = {'rel_error': rel.tolist(), 'mean_rel_error': float(rel.mean()),
                  'mae': np.mean(np.abs(pred - rows['targets']), 0).tolist(),
                  'mean_true': np.mean(rows['targets'], 0).tolist(), 'rows': int(len(pred))}
    if train_mean is not None:
      const = np.broadcast_to(np.asarray(train_mean, np.float64), rows['targets'].shape)
      out[split]['mean_rel_error_train_mean'] = float(relative_error(const,
                                                                     rows['targets']).mean())
  if jax.process_index() == 0:  # every process computes the same numbers
    atomic_write(os.path.join(stage_dir(workdir), 'eval.json'), json.dumps(out, indent=1))
  return out


def format_eval(ev: dict[str, Any]) -> str:
  """Tables S3 / S4 layout: one line per split, relative error per exit in %."""
  head = ' '.join(f'B{k:<5}' for k in ev['exits'])
  lines = [f'{"split":<12} {head} mean   (predicting the train mean)']
  for split in ('validation', 'test', 'calibration', 'train'):
    if split in ev:
      r = ev[split]
      base = r.get('mean_rel_error_train_mean')
      lines.append(f'{split:<12} ' + ' '.join(f'{100 * v:5.1f}%' for v in r['rel_error'])
                   + f' {100 * r["mean_rel_error"]:5.1f}%'
                   + ('' if base is None else f'  ({100 * base:5.1f}%)'))
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# The stage.


class TrainRows:
  """Random-access source of predictor rows for the data Loader."""

  def __init__(self, rows: dict[str, np.ndarray]):
    self.feats, self.targets = rows['feats'], rows['targets']

  def __len__(self) -> int:
    return len(self.targets)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {'feats': self.feats[i], 'targets': self.targets[i]}


def datasets(backbone: Backbone, workdir: str) -> dict[str, dict[str, Any]]:
  """Every predictor split's rows (`core.predictor_data.dataset`), one target pass compiled
  for all; process 0 computes and caches each split, the others then read its cache."""
  pipeline = stages.load_pipeline(backbone, workdir, stages=('backbone', 'bank', 'branches'))
  targets = predictor_data.targets_for(backbone, pipeline)
  lp_params = lpips_lib.load_params()
  return {s: parallel.chief_first(
      lambda s=s: predictor_data.dataset(backbone, workdir, s, lp_params=lp_params,
                                         targets=targets), f'predictor rows {s}')
          for s in SPLITS}


def train_and_evaluate(backbone: Backbone, workdir: str) -> dict[str, PyTree]:
  """`train.py --stage=predictor`: build (or reuse) the datasets, train (or resume) the
  predictor, checkpoint it under `<workdir>/checkpoints/predictor`, print and save the
  relative error per exit on validation and test. Returns the final host state."""
  from fiancee_jax.data import loader as data_loader  # noqa: PLC0415 (heavy: tfds)

  config = backbone.config
  cfg.validate(config)
  p = config.predictor
  rows = datasets(backbone, workdir)
  model = predictor_model.model(backbone)
  tx = make_optimizer(config)
  step_fn = functools.partial(train_step, model=model, tx=tx, loss=p.loss)
  dp = parallel.wrap(step_fn, config.parallel)
  parallel.check_batch_size(p.batch_size, dp.num_devices, 'predictor.batch_size')

  train_src = TrainRows(rows['train'])
  if len(train_src) < p.batch_size:
    raise PredictorDataError(f'predictor.batch_size={p.batch_size} exceeds the '
                             f'{len(train_src)} training rows (predictor.num_train x '
                             'predictor.num_noises)')
  ckpt = checkpoint.Checkpointer(workdir, STAGE, config)
  host = create_state(backbone, rows['train']['feats'].shape[1:], model, tx,
                      rows['train']['targets'])
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
    ev = evaluate(backbone, workdir, model, host['params'],
                  {s: rows[s] for s in ('validation', 'test', 'calibration')},
                  train_mean=rows['train']['targets'].mean(0))
    print(f'[{STAGE}] relative error per exit ({ev["definition"]}):\n{format_eval(ev)}',
          flush=True)
    if ckpt.latest_step() != int(host['step']):
      ckpt.save(int(host['step']), host, {'data': loader.state(), 'eval': ev})
  finally:
    ckpt.close()
  return host

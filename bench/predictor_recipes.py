"""Predictor training recipes side by side on a workdir's cached predictor rows.

  python bench/predictor_recipes.py --config configs/oasis_synthetic.py --workdir runs/demo \
      [--seeds 0,1,2] [--threshold 0.1] [--alpha 0.1]

Reads the rows `train.py --stage=predictor` cached (train / validation / calibration / test)
and trains the config's predictor model with each recipe, through the stage's own code
(`train.predictor`: create_state, train_step, make_optimizer, the data Loader), for
config.predictor.num_steps steps per seed:
  oracle       no predictor: every row's true LPIPS (the best any predictor could route)
  train_mean   no training: every row gets the training rows' mean LPIPS per exit
  paper        SGD lr 0.01 + cosine, MSE on raw LPIPS (Eq. S2, the paper's recipe)
  sgd_norm     the same on standardised targets (predictor.target_norm)
  adam         Adam lr 1e-3 + cosine, raw targets
  adam_norm    Adam lr 1e-3 + cosine, standardised targets (the demo config's)
Per recipe and seed one JSON line: relative error (mean |pred - true| / mean true, averaged over
the exits) on each split, the conformal offset at --threshold / --alpha from the calibration
rows, and on the test rows the calibrated rule's GMACs share of the backbone, violation rate
and exit counts, beside the paper rule's (offset 0). Then a markdown table of the means over
the seeds. Seconds of predictor training only: the rows are not recomputed.
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

RECIPES = {'oracle': None, 'train_mean': None,
           'paper': ('sgd_cosine', 0.01, False),
           'sgd_norm': ('sgd_cosine', 0.01, True),
           'adam': ('adam_cosine', 1e-3, False),
           'adam_norm': ('adam_cosine', 1e-3, True)}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='configs/oasis_synthetic.py')
  ap.add_argument('--workdir', default='runs/demo')
  ap.add_argument('--seeds', default='0,1,2')
  ap.add_argument('--threshold', type=float, default=0.1)
  ap.add_argument('--alpha', type=float, default=0.1)
  ap.add_argument('--recipes', default=','.join(RECIPES))
  a = ap.parse_args()

  import jax  # noqa: PLC0415
  from fiancee_jax import config as cfg, registry  # noqa: PLC0415
  from fiancee_jax.core import predictor_data, predictor_model, routing  # noqa: PLC0415
  from fiancee_jax.data import loader as data_loader  # noqa: PLC0415
  from fiancee_jax.infer.engine import device_name  # noqa: PLC0415
  from fiancee_jax.train import predictor as tp  # noqa: PLC0415

  base = cfg.load(a.config)
  bb = registry.get(base)
  try:
    rows = {s: predictor_data.cached(bb, a.workdir, s) for s in predictor_data.SPLITS}
  except predictor_data.PredictorDataError as e:
    sys.exit(f'predictor_recipes: {e}')
  costs = np.asarray(bb.route_costs(bool(base.branches.use_bank)), np.float64)
  train_mean = rows['train']['targets'].mean(0)
  dev = device_name()

  def score(name: str, seed: int, seconds: float, pred_of) -> dict:
    pred = {s: pred_of(rows[s]) for s in ('validation', 'calibration', 'test')}
    out = {'name': 'predictor_recipe', 'recipe': name, 'seed': seed, 'device': dev,
           'train_seconds': round(seconds, 1)}
    for s, p in pred.items():
      out[f'rel_error_{s}'] = float(tp.relative_error(p, rows[s]['targets']).mean())
    lam = routing.conformal_offset(pred['calibration'], rows['calibration']['targets'],
                                   a.threshold, a.alpha, costs)
    out['offset'] = lam
    for tag, off in (('calibrated', lam), ('paper_rule', 0.0)):
      ex = np.asarray(routing.choose_exit(pred['test'], a.threshold, costs, off))
      true = routing.chosen_lpips(rows['test']['targets'], ex)
      out[f'{tag}_gmacs_share'] = float(costs[ex].mean() / costs[-1])
      out[f'{tag}_violation_rate'] = float(np.mean(true > a.threshold))
      out[f'{tag}_exit_counts'] = np.bincount(ex, minlength=len(costs)).tolist()
    print(json.dumps(out), flush=True)
    return out

  results = []
  for name in a.recipes.split(','):
    recipe = RECIPES[name]
    for seed in [int(s) for s in a.seeds.split(',')]:
      if recipe is None:
        results.append(score(name, seed, 0.0, (lambda r: r['targets']) if name == 'oracle' else
                             lambda r: np.broadcast_to(train_mean, r['targets'].shape)))
        continue
      c = cfg.load(a.config)
      c.predictor.optimizer, c.predictor.lr, c.predictor.target_norm = recipe
      c.seed = seed
      b = registry.get(c)
      model, tx = predictor_model.model(b), tp.make_optimizer(c)
      step = jax.jit(functools.partial(tp.train_step, model=model, tx=tx, loss=c.predictor.loss,
                                       axis_name=None))
      t0 = time.perf_counter()
      state = tp.create_state(b, rows['train']['feats'].shape[1:], model, tx,
                              rows['train']['targets'])
      it = iter(data_loader.Loader(tp.TrainRows(rows['train']), c.predictor.batch_size, seed=seed))
      for _ in range(int(c.predictor.num_steps)):
        batch = next(it)
        state, _ = step(state, {k: batch[k] for k in ('feats', 'targets')})
      params = jax.device_get(state['params'])
      results.append(score(name, seed, time.perf_counter() - t0,
                           lambda r: tp.predict(model, params, r['feats'])))

  print(f'\n{len(a.seeds.split(","))} seed(s), threshold {a.threshold}, alpha {a.alpha}, '
        f'{len(rows["train"]["targets"])} train / {len(rows["calibration"]["targets"])} '
        f'calibration / {len(rows["test"]["targets"])} test rows, {dev}\n')
  print('| recipe | rel. error val / test | offset | GMACs share, calibrated | violation, '
        'calibrated | GMACs share, paper rule | violation, paper rule |')
  print('|---|---|---|---|---|---|---|')
  for name in a.recipes.split(','):
    r = [x for x in results if x['recipe'] == name]
    m = {k: float(np.mean([x[k] for x in r])) for k in r[0] if isinstance(r[0][k], float)}
    print(f'| {name} | {100 * m["rel_error_validation"]:.1f}% / {100 * m["rel_error_test"]:.1f}% '
          f'| {m["offset"]:.4f} | {m["calibrated_gmacs_share"]:.3f} | '
          f'{m["calibrated_violation_rate"]:.3f} | {m["paper_rule_gmacs_share"]:.3f} | '
          f'{m["paper_rule_violation_rate"]:.3f} |')


if __name__ == '__main__':
  main()

"""Per-exit quality with and without the bank (a Table S1-like table) on a trained workdir.

  python bench/exit_quality.py --config configs/oasis_synthetic.py --workdir runs/demo --num 100

Prints one JSON line per (bank, route): mean LPIPS vs the backbone image, small-sample FID vs
the real test images (compare only numbers with the same --num), GMACs of the route. Needs the
branch stage trained with the bank (checkpoints/branches) and/or without it
(checkpoints/branches_nobank, `--config.branches.use_bank=False`); a missing one is skipped with
a message. Also writes label | backbone | exits sample grids to --out.
"""
import argparse
import json
import os

import jax

from fiancee_jax import config as cfg
from fiancee_jax import registry
from fiancee_jax.core.pipeline import PipelineError
from fiancee_jax.train import branches


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', required=True)
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--num', type=int, default=100, help='test maps evaluated')
  ap.add_argument('--out', default=None, help='folder for sample grids (default: workdir)')
  a = ap.parse_args()
  bb = registry.get(cfg.load(a.config))
  out = a.out or a.workdir
  for use_bank in (True, False):
    try:
      rows = branches.evaluate_exits(bb, a.workdir, 'test', use_bank, num=a.num)
    except PipelineError as e:
      print(json.dumps({'bank': use_bank, 'skipped': str(e)}))
      continue
    for route, r in rows.items():
      print(json.dumps({'name': 'exit_quality', 'bank': use_bank, 'route': route, **r,
                        'device': str(jax.devices()[0])}), flush=True)
    branches.sample_grid(bb, a.workdir, os.path.join(
        out, f'exits_{"bank" if use_bank else "nobank"}.png'), use_bank=use_bank)


if __name__ == '__main__':
  main()

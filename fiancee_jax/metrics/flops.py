"""GMACs and parameters of every route of an experiment config, from shapes only (CLI).

  python -m fiancee_jax.metrics.flops --config configs/oasis_cityscapes.py --json

One line (or JSON line) per route: the backbone first, then every exit for each scale factor
of the paper's tables, bank off and on (`Backbone.flops_routes`; counting: `metrics.macs`).
"""
from __future__ import annotations

import argparse
import json

from fiancee_jax import config as cfg
from fiancee_jax import registry
from fiancee_jax.core.interface import Backbone
from fiancee_jax.metrics import macs


def measure(backbone: Backbone, count_padded: bool = True) -> list[dict]:
  """One dict per route: route, gmacs, params, resolution (+ route extras)."""
  rows = []
  c = backbone.config
  for r in backbone.flops_routes():
    n = macs.count_macs(r.fn, *r.args, count_padded=count_padded)
    rows.append({'route': r.name, 'gmacs': round(n / 1e9, 3), 'macs': n,
                 'params': r.params, 'resolution': list(r.resolution),
                 'backbone': backbone.name, 'config': c.name, **r.extra})
  return rows


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', required=True, help='configs/<name>.py[:arg]')
  ap.add_argument('--json', action='store_true', help='one JSON line per route')
  ap.add_argument('--no-padded', action='store_true',
                  help='count only taps on real input (XLA convention)')
  a = ap.parse_args(argv)
  rows = measure(registry.get(cfg.load(a.config)), count_padded=not a.no_padded)
  for row in rows:
    if a.json:
      print(json.dumps(row))
    else:
      tag = f"  sf={row['sf']:.4g} bank={row['bank']}" if 'sf' in row else ''
      print(f"{row['route']:>12s}  {row['gmacs']:10.3f} GMACs  {row['params'] / 1e6:8.3f}M "
            f"params  {row['resolution'][0]}x{row['resolution'][1]}{tag}")


if __name__ == '__main__':
  main()

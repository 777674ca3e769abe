"""Per-exit quality with and without the bank on a trained workdir: the demo's Table S1 + Fig. 8.

  python bench/exit_quality.py --config configs/oasis_synthetic.py --workdir runs/demo \
      --noises 3 --out docs/fig8_exit_lpips.png

Per route (exit1..exitE, backbone) and branch stage (checkpoints/branches, branches_nobank): FID
vs the split's real images on (maps x --noises) generated images, mIoU of the workdir's
segmenter (trained once per workdir on the real train images, `fiancee_jax.metrics.segmenter`,
then reused) on those images against their input label maps, mean LPIPS vs the backbone on the
first --lpips_noises noise(s) per map, GMACs (`fiancee_jax.metrics.exit_quality`). Prints the
segmenter's mIoU on the real images (the ceiling), one JSON line per (bank, route), then a
markdown table; writes the Fig. 8 analogue (per-exit LPIPS densities with vs without the bank)
to --out and, with --grids DIR, label | backbone | exits sample grids. A missing branch stage is
skipped with a message. Passes are cached under <workdir>/exit_quality/.
"""
import argparse
import json
import os
import time

from fiancee_jax import config as cfg
from fiancee_jax import registry
from fiancee_jax.infer.engine import device_name
from fiancee_jax.metrics import exit_quality as eq
from fiancee_jax.metrics import segmenter as seg_lib


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', required=True)
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--split', default='test')
  ap.add_argument('--num', type=int, default=None, help='maps of the split (default all)')
  ap.add_argument('--noises', type=int, default=3, help='generated images per map (FID, mIoU)')
  ap.add_argument('--lpips_noises', type=int, default=1,
                  help='of those, how many per map also get LPIPS vs the backbone (Fig. 8)')
  ap.add_argument('--batch_size', type=int, default=8)
  ap.add_argument('--out', default='docs/fig8_exit_lpips.png', help='Fig. 8 analogue PNG')
  ap.add_argument('--grids', default=None, help='folder for label | backbone | exits grids')
  ap.add_argument('--cache_dir', default=None, help='default <workdir>/exit_quality')
  ap.add_argument('--stages', default='both', choices=('both', 'bank', 'nobank'),
                  help='branch stages to evaluate (e.g. one per process)')
  ap.add_argument('--branch_step', type=int, default=None,
                  help='branch checkpoint step to score (default the latest; an older one only '
                  'from the caches)')
  ap.add_argument('--backbone_only', action='store_true',
                  help='only fill the caches of the real images and the backbone (they do not '
                  'depend on the branches: run it while the branches train)')
  a = ap.parse_args()
  config = cfg.load(a.config)
  bb = registry.get(config)
  dev, t0 = device_name(), time.time()
  seg = seg_lib.ensure(config, a.workdir)
  res = eq.evaluate(bb, a.workdir, seg, split=a.split, num=a.num, noises=a.noises,
                    lpips_noises=a.lpips_noises, batch_size=a.batch_size,
                    cache_dir=a.cache_dir, backbone_only=a.backbone_only,
                    branch_step=a.branch_step,
                    banks={'both': (True, False), 'bank': (True,), 'nobank': (False,)}[a.stages])
  print(json.dumps({'name': 'segmenter_ceiling', **res['real'],
                    'segmenter_train_seconds': seg.meta.get('seconds'),
                    'segmenter_steps': seg.meta.get('step'), 'device': dev}), flush=True)
  if a.backbone_only:
    return
  for stage in ('bank', 'nobank'):
    rows = res.get(stage, {'skipped': '--stages'})
    if 'skipped' in rows:
      print(json.dumps({'name': 'exit_quality', 'bank': stage == 'bank', **rows}), flush=True)
      continue
    for route, r in rows.items():
      print(json.dumps({'name': 'exit_quality', 'bank': stage == 'bank', 'route': route, **r,
                        'device': dev}), flush=True)
  per = res['lpips_per_input']
  if any(per.values()):
    steps = {s: r[next(iter(r))]['branch_step'] for s, r in
             (('bank', res.get('bank', {'skipped': 1})),
              ('no bank', res.get('nobank', {'skipped': 1}))) if 'skipped' not in r}
    eq.fig8(per, a.out, title='LPIPS vs the backbone per exit, with and without the bank '
            f'(branch steps {steps}, {dev})')
    print(json.dumps({'name': 'exit_quality_fig8', 'path': a.out}), flush=True)
  if a.grids:
    from fiancee_jax.train import branches  # noqa: PLC0415
    for use_bank, stage in ((True, 'bank'), (False, 'nobank')):
      if 'skipped' not in res.get(stage, {'skipped': 1}):
        branches.sample_grid(bb, a.workdir, os.path.join(a.grids, f'exits_{stage}.png'),
                             use_bank=use_bank)
  print(f'\n{eq.table(res)}\n\n{dev}; {time.time() - t0:.0f} s', flush=True)


if __name__ == '__main__':
  main()

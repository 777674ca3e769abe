"""Preview grid of a dataset: `python -m fiancee_jax.data.preview --dataset synthetic_streets
--out streets.png` (images next to their colourised label maps), `--dataset synthetic_heads`
(heads with their pose written on each). Synthetic datasets are rendered directly (nothing
prepared); cityscapes / video_frames are read through `prepare` + `source`."""
from __future__ import annotations

import argparse
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from fiancee_jax.data import common, heads, streets
from fiancee_jax.io_utils import atomic_open


def streets_grid(n: int, height: int, width: int, seed: int = 0, split: str = 'train'
                 ) -> np.ndarray:
  """n rows of [image | Cityscapes-coloured label map] with the difficulty written on each."""
  rows = []
  for i in range(n):
    image, label, diff = streets.render(common.example_rng(seed, split, i), height, width)
    row = Image.fromarray(np.concatenate([image, common.colorize(label)], 1))
    ImageDraw.Draw(row).text((3, 2), f'#{i} difficulty {diff:.2f}', fill=(255, 255, 0))
    rows.append(np.asarray(row))
  return np.concatenate(rows, 0)


def heads_grid(num_identities: int, frames: int, size: int, seed: int = 0) -> np.ndarray:
  """Rows = identities, columns = frames; yaw/pitch/roll (degrees) written on each."""
  rows = []
  for ident in range(num_identities):
    tiles = []
    for f in range(frames):
      ex = heads.render_frame(seed, ident, f, size)
      tile = Image.fromarray(ex['image'])
      y, p, r = ex['pose']
      d = ImageDraw.Draw(tile)
      d.text((3, 2), f'id {ident}', fill=(255, 255, 255))
      d.text((3, size - 12), f'y{y:+.0f} p{p:+.0f} r{r:+.0f}', fill=(255, 255, 0))
      tiles.append(np.asarray(tile))
    rows.append(np.concatenate(tiles, 1))
  return np.concatenate(rows, 0)


def dataset_grid(name: str, manual_dir: str, height: int, width: int, n: int) -> np.ndarray:
  """Grid of a prepared manual dataset (cityscapes: image | labels; video_frames: frames)."""
  from fiancee_jax import data
  cfg = dict(name=name, manual_dir=manual_dir, height=height, width=width)
  with tempfile.TemporaryDirectory() as tmp:
    src = data.source(cfg, 'train', tmp)
    exs = [src[i] for i in range(min(n, len(src)))]
  if name == 'cityscapes':
    return np.concatenate([np.concatenate([e['image'], common.colorize(e['label'])], 1)
                           for e in exs], 0)
  return np.concatenate([e['image'] for e in exs], 1)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--dataset', default='synthetic_streets',
                  choices=['synthetic_streets', 'synthetic_heads', 'cityscapes', 'video_frames'])
  ap.add_argument('--out', default=None, help='PNG path (default <dataset>.png)')
  ap.add_argument('--height', type=int, default=None)
  ap.add_argument('--width', type=int, default=None)
  ap.add_argument('--num', type=int, default=6, help='rows (streets) / identities (heads)')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--manual_dir', default='')
  a = ap.parse_args(argv)
  if a.dataset == 'synthetic_streets':
    grid = streets_grid(a.num, a.height or 128, a.width or 256, a.seed)
  elif a.dataset == 'synthetic_heads':
    grid = heads_grid(a.num, 6, a.height or 128, a.seed)
  else:
    grid = dataset_grid(a.dataset, a.manual_dir, a.height or 256, a.width or 512, a.num)
  out = a.out or f'{a.dataset}.png'
  with atomic_open(out) as f:
    Image.fromarray(grid).save(f, format='PNG')
  print(f'wrote {out} ({grid.shape[1]}x{grid.shape[0]})')


if __name__ == '__main__':
  main()

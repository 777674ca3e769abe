"""cityscapes (fake tree) and video_frames (generated video + frames folder): round trip and
clear errors on missing / corrupt input."""
import pathlib

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from fiancee_jax import data
from fiancee_jax.data.builders import DataError


def _cityscapes_tree(root: pathlib.Path, with_val=True):
  rng = np.random.default_rng(0)
  for split, n in (('train', 2), ('val', 1 if with_val else 0)):
    for i in range(n):
      city = 'aachen' if split == 'train' else 'lindau'
      stem = f'{city}_{i:06d}_000019'
      (root / 'leftImg8bit' / split / city).mkdir(parents=True, exist_ok=True)
      (root / 'gtFine' / split / city).mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)).save(
          root / 'leftImg8bit' / split / city / f'{stem}_leftImg8bit.png')
      label = np.zeros((64, 128), np.uint8)
      label[:32] = 23                               # sky on top
      label[32:, :64] = 7                           # road bottom left
      label[32:, 64:] = 255                         # out-of-range id -> 34 'unknown'
      Image.fromarray(label).save(root / 'gtFine' / split / city / f'{stem}_gtFine_labelIds.png')


def test_cityscapes_round_trip(tmp_path):
  _cityscapes_tree(tmp_path / 'cs')
  cfg = dict(name='cityscapes', height=32, width=64, manual_dir=str(tmp_path / 'cs'))
  train = data.source(cfg, 'train', str(tmp_path / 'data'))
  val = data.source(cfg, 'validation', str(tmp_path / 'data'))
  assert len(train) == 2 and len(val) == 1
  ex = train[1]
  assert ex['image'].shape == (32, 64, 3) and ex['label'].shape == (32, 64)
  assert ex['file_name'] == 'aachen_000001_000019_leftImg8bit.png'
  # Nearest resize keeps the ids exactly; 255 -> 34.
  assert set(np.unique(ex['label'])) == {7, 23, 34}
  assert (ex['label'][:16] == 23).all() and (ex['label'][16:, :32] == 7).all()
  # Image is the bicubic resize of the original.
  orig = np.asarray(Image.open(tmp_path / 'cs/leftImg8bit/train/aachen/'
                               'aachen_000001_000019_leftImg8bit.png'))
  ref = np.asarray(Image.fromarray(orig).resize((64, 32), Image.BICUBIC))
  np.testing.assert_array_equal(ex['image'], ref)


def test_cityscapes_missing_and_incomplete(tmp_path):
  with pytest.raises(DataError, match='leftImg8bit/{train,val}'):
    data.prepare(dict(name='cityscapes', manual_dir=str(tmp_path / 'nope')), str(tmp_path / 'd'))
  _cityscapes_tree(tmp_path / 'cs')
  lab = next((tmp_path / 'cs/gtFine/train').glob('*/*labelIds.png'))
  lab.unlink()
  with pytest.raises(DataError, match=f'missing label file .*{lab.name}'):
    data.prepare(dict(name='cityscapes', height=32, width=64, manual_dir=str(tmp_path / 'cs')),
                 str(tmp_path / 'd'))
  assert not list((tmp_path / 'd').rglob('*.array_record*'))   # nothing half-written


def _video_tree(root: pathlib.Path):
  """id0/vidA/clip.mp4 (generated, 10 frames 48x64), id1/vidB/ frames (png), id2/vidC/ frames."""
  clip_dir = root / 'id0' / 'vidA'
  clip_dir.mkdir(parents=True)
  frames = []
  for k in range(10):
    f = np.zeros((48, 64, 3), np.uint8)
    f[:, 8 + 4 * k:16 + 4 * k] = 255               # a bar moving right
    frames.append(f)
  imageio.mimwrite(clip_dir / 'clip.mp4', frames, fps=10, macro_block_size=16)
  for ident, vid in (('id1', 'vidB'), ('id2', 'vidC')):
    d = root / ident / vid
    d.mkdir(parents=True)
    for k in range(3):
      Image.fromarray(np.full((40, 60, 3), 40 * k + 20, np.uint8)).save(d / f'{k:03d}.png')


def test_video_frames_round_trip(tmp_path):
  _video_tree(tmp_path / 'vox')
  cfg = dict(name='video_frames', height=16, width=16, manual_dir=str(tmp_path / 'vox'),
             frames_per_video=4)
  train = data.source(cfg, 'train', str(tmp_path / 'data'))
  assert len(train) == 4                            # id0: 4 of the clip's 10 frames
  xs = []
  for i in range(4):
    ex = train[i]
    assert ex['image'].shape == (16, 16, 3) and int(ex['video']) == 0
    xs.append(np.nonzero(ex['image'][8, :, 0] > 128)[0].mean())
  assert all(b > a for a, b in zip(xs, xs[1:]))     # frames in time order (bar moves right)
  val = data.source(cfg, 'validation', str(tmp_path / 'data'))
  assert len(val) == 3 and val[0]['file_name'] == '000.png'
  np.testing.assert_allclose(val[2]['image'], 100, atol=1)
  pairs = data.reenactment_pairs(train, seed=0)
  p = pairs[1]
  assert p['source_video'] == p['driver_video'] and p['source_frame'] != p['driver_frame']


def test_video_frames_errors_name_the_file(tmp_path):
  with pytest.raises(DataError, match='identity>/<video>'):
    data.prepare(dict(name='video_frames', height=16, width=16,
                      manual_dir=str(tmp_path / 'missing')), str(tmp_path / 'd'))
  bad = tmp_path / 'vox' / 'id0' / 'v'
  bad.mkdir(parents=True)
  (bad / 'broken.mp4').write_bytes(b'not a video at all')
  with pytest.raises(DataError, match='cannot read video .*broken.mp4'):
    data.prepare(dict(name='video_frames', height=16, width=16,
                      manual_dir=str(tmp_path / 'vox')), str(tmp_path / 'd'))
  bad2 = tmp_path / 'vox2' / 'id0' / 'v'
  bad2.mkdir(parents=True)
  (bad2 / '000.png').write_bytes(b'\x89PNG broken')
  with pytest.raises(DataError, match='cannot read image .*000.png'):
    data.prepare(dict(name='video_frames', height=16, width=16,
                      manual_dir=str(tmp_path / 'vox2')), str(tmp_path / 'd2'))


def test_video_frames_needs_a_frame_per_video(tmp_path):
  with pytest.raises(DataError, match='frames_per_video=0'):
    data.prepare(dict(name='video_frames', height=16, width=16, frames_per_video=0,
                      manual_dir=str(tmp_path)), str(tmp_path / 'd'))


def test_two_downloads_in_one_data_dir_stay_apart(tmp_path):
  """Prepared folders are named after the manual download too: a second video folder prepared
  into the same data_dir is read from its own records, not the first one's."""
  _video_tree(tmp_path / 'vox')
  (tmp_path / 'other' / 'id9' / 'v0').mkdir(parents=True)
  for i in range(3):
    Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)).save(
        tmp_path / 'other' / 'id9' / 'v0' / f'{i:03d}.png')
  base = dict(name='video_frames', height=16, width=16, frames_per_video=4)
  a = data.source(dict(base, manual_dir=str(tmp_path / 'vox')), 'train', str(tmp_path / 'd'))
  b = data.source(dict(base, manual_dir=str(tmp_path / 'other')), 'train', str(tmp_path / 'd'))
  assert len(a) == 4 and len(b) == 3
  np.testing.assert_allclose(b[2]['image'], 60, atol=1)

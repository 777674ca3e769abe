"""synthetic_streets / synthetic_heads: determinism, ranges, shapes, prepare + read round trip."""
import sys

import numpy as np
import pytest

from fiancee_jax import data
from fiancee_jax.data import common, heads, streets


def _street(seed, index, h=32, w=64, split='train'):
  return streets.render(common.example_rng(seed, split, index), h, w)


def test_streets_deterministic_and_seed_dependent():
  a, b = _street(0, 3), _street(0, 3)
  assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
  assert a[2] == b[2]
  c = _street(1, 3)
  assert a[0].tobytes() != c[0].tobytes()
  assert _street(0, 3, split='validation')[0].tobytes() != a[0].tobytes()


def test_streets_labels_shapes_and_difficulty():
  diffs, classes = [], set()
  for i in range(12):
    image, label, diff = _street(0, i)
    assert image.shape == (32, 64, 3) and image.dtype == np.uint8
    assert label.shape == (32, 64) and label.dtype == np.uint8
    assert label.max() <= 34
    assert 0.0 <= diff <= 1.0
    diffs.append(diff)
    classes |= set(np.unique(label).tolist())
  assert np.std(diffs) > 0.05, diffs                 # difficulty varies by construction
  # A street scene: sky, road, sidewalk, building always; objects across the set.
  assert {streets.SKY, streets.ROAD, streets.BUILDING, streets.CAR, streets.PERSON,
          streets.POLE} <= classes, classes
  # Same scene at two resolutions: label layouts agree after nearest downsampling.
  _, small, _ = _street(0, 5, 32, 64)
  _, big, _ = _street(0, 5, 64, 128)
  assert np.mean(big[::2, ::2] == small) > 0.8


def test_heads_pose_moves_features_and_deterministic():
  p = heads.identity_params(0, 1)
  zero = np.zeros(heads.EXPR_DIM, np.float32)
  def feature_x(yaw):   # mean column of the dark facial features (brows, pupils, nostrils)
    image, mask = heads.render(p, np.array([yaw, 0, 0.]), zero, 48)
    dark = (image.astype(int).sum(-1) < 200) & (mask > 0)
    dark[int(48 * 0.6):] = False                 # head only (not the shirt)
    return np.nonzero(dark)[1].mean()
  # Positive yaw turns the face to the image's right; the far half foreshortens.
  assert feature_x(35) > feature_x(0) + 2 > feature_x(-35) + 4
  a = heads.render_frame(0, 2, 3, 32)
  b = heads.render_frame(0, 2, 3, 32)
  assert a['image'].tobytes() == b['image'].tobytes()
  assert heads.render_frame(1, 2, 3, 32)['image'].tobytes() != a['image'].tobytes()
  assert a['mask'].shape == (32, 32) and set(np.unique(a['mask'])) <= {0, 255}
  assert 0.2 < (a['mask'] > 0).mean() < 0.9
  # Mouth open changes the mouth region only (lower half of the face).
  e = zero.copy(); e[0] = 1.0
  closed, _ = heads.render(p, np.zeros(3), zero, 48)
  opened, _ = heads.render(p, np.zeros(3), e, 48)
  rows = np.nonzero(np.any(closed != opened, axis=(1, 2)))[0]
  assert len(rows) and rows.min() > 48 * 0.4


def test_heads_identity_splits_disjoint():
  s = heads.split_identities(40)
  assert len(s['train']) == 32 and len(s['validation']) == 4 and len(s['test']) == 4
  assert not set(s['train']) & set(s['validation']) and not set(s['validation']) & set(s['test'])


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


def test_streets_round_trip(data_dir):
  cfg = dict(name='synthetic_streets', height=32, width=64, num_train=5, num_validation=2,
             num_test=2, seed=0)
  path = data.prepare(cfg, data_dir)
  assert '32x64' in str(path) and any(p.name.endswith('00001') for p in path.iterdir())
  src = data.source(cfg, 'train', data_dir)
  assert len(src) == 5 and len(data.source(cfg, 'test', data_dir)) == 2
  ex = src[3]
  image, label, diff = _street(0, 3)
  np.testing.assert_array_equal(ex['image'], image)   # PNG: lossless
  np.testing.assert_array_equal(ex['label'], label)
  assert ex['difficulty'].dtype == np.float32 and abs(float(ex['difficulty']) - diff) < 1e-6
  assert int(ex['index']) == 3
  # Another resolution never collides with this one.
  other = dict(cfg, height=64, width=128)
  assert data.prepare(other, data_dir) != path
  assert data.source(other, 'train', data_dir)[0]['image'].shape == (64, 128, 3)
  assert 'tensorflow' not in sys.modules


def test_heads_round_trip_pairs_and_triplets(data_dir):
  cfg = dict(name='synthetic_heads', height=32, width=32, num_identities=4,
             frames_per_identity=3, seed=0)
  data.prepare(cfg, data_dir)
  train = data.source(cfg, 'train', data_dir)
  assert len(train) == 2 * 3                        # 4 ids -> 2 train, 1 val, 1 test
  ex = train[4]
  assert ex['image'].shape == (32, 32, 3) and ex['mask'].shape == (32, 32)
  assert ex['pose'].shape == (3,) and ex['pose'].dtype == np.float32
  assert ex['expression'].shape == (heads.EXPR_DIM,)
  assert int(ex['identity']) == 1 and int(ex['frame']) == 1
  np.testing.assert_array_equal(ex['image'], heads.render_frame(0, 1, 1, 32)['image'])
  val_ids = {int(e['identity']) for e in data.source(cfg, 'validation', data_dir)}
  assert val_ids == {2}
  pairs = data.reenactment_pairs(train, seed=0)
  for i in range(len(pairs)):
    p = pairs[i]
    assert p['source_identity'] == p['driver_identity'] and p['source_index'] != p['driver_index']
  assert pairs[2]['driver_index'] == data.reenactment_pairs(train, seed=0)[2]['driver_index']
  trip = data.cross_reenactment(train, seed=0, num=4)
  for k in range(len(trip)):
    t = trip[k]
    assert t['source_identity'] != t['driver_identity']
    ref = heads.render_target(0, int(t['source_identity']), t['driver_pose'],
                              t['driver_expression'], 32)
    np.testing.assert_array_equal(t['target_image'], ref['image'])
    # Target = the driver's own frame would need the driver's identity: it differs.
    assert not np.array_equal(t['target_image'], t['driver_image'])
  # A frame of identity 0 re-rendered with its own pose/expression is the stored frame.
  own = heads.render_target(0, 0, train[0]['pose'], train[0]['expression'], 32)
  np.testing.assert_array_equal(own['image'], train[0]['image'])


def test_bad_config_names_input(data_dir):
  with pytest.raises(ValueError, match="data.name='nope'"):
    data.source(dict(name='nope'), 'train', data_dir)
  with pytest.raises(ValueError, match='split'):
    data.source(dict(name='synthetic_streets', height=32, width=64, num_train=5,
                     num_validation=2, num_test=2), 'dev', data_dir)

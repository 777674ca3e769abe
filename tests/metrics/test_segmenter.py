"""The mIoU segmenter (fiancee_jax/metrics/segmenter.py): it learns the real label maps, it is
cached per workdir and deterministic, and mIoU matches hand-computed values."""
import dataclasses

import jax
import numpy as np
import pytest

from fiancee_jax.metrics import segmenter as sg
from tests.conftest import tiny_config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp('seg')
  c = tiny_config(root / 'data')
  lines = []
  s = sg.train(c, str(root / 'wd'), sg.TINY, log=lines.append)
  return c, str(root / 'wd'), s, lines


def test_segmenter_learns_its_training_images(trained):
  """A few dozen steps on 16 real train images: mIoU on them far above what predicting the
  most frequent class everywhere gets (a broken loss or label mapping stays near that)."""
  c, wd, s, lines = trained
  images, labels = sg.load_split(c, wd, 'train')
  got = s.score(images, labels)
  majority = np.full_like(labels, np.bincount(labels.ravel()).argmax())
  floor = sg.miou(majority, labels, c.data.num_classes)
  assert got > max(0.08, 5 * floor), (got, floor)       # measured: 0.138 vs 0.014
  acc = np.mean(s.predict(images) == labels)
  assert acc > np.mean(majority == labels) + 0.15, acc  # measured: 0.53 vs 0.26
  assert s.meta['step'] == sg.TINY.steps
  assert any(line.startswith('segmenter step 10/') for line in lines), lines


def test_segmenter_is_cached(trained):
  c, wd, s, _ = trained
  lines = []
  again = sg.ensure(c, wd, sg.TINY, log=lines.append)   # loads, does not train
  assert not lines
  x = sg.load_split(c, wd, 'test')[0]
  np.testing.assert_array_equal(again.predict(x), s.predict(x))
  with pytest.raises(sg.SegmenterError, match='no finished segmenter'):
    sg.load(c, wd, dataclasses.replace(sg.TINY, seed=1))   # other settings: not this file


class _Killed(Exception):
  pass


def test_killed_run_resumes_to_the_same_weights(trained, tmp_path):
  """Deterministic given the seed: a run killed after its step-2 checkpoint and resumed ends
  with the weights of the same run done in one go."""
  c = trained[0]
  short = dataclasses.replace(sg.TINY, steps=4, ckpt_every=2, log_every=3)
  whole = sg.train(c, str(tmp_path / 'whole'), short, log=lambda _: None)

  def kill(line):
    if 'step 3/' in line:
      raise _Killed
  part = str(tmp_path / 'part')
  with pytest.raises(_Killed):
    sg.train(c, part, short, log=kill)
  assert sg.read_meta(part)['step'] == 2
  lines = []
  resumed = sg.train(c, part, short, log=lines.append)
  assert any('resuming' in line and 'step 2/4' in line for line in lines), lines
  for a, b in zip(jax.tree_util.tree_leaves(whole.params),
                  jax.tree_util.tree_leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_miou_hand_computed():
  pred = np.array([[0, 0, 1], [1, 2, 2]])
  label = np.array([[0, 1, 1], [1, 2, 0]])
  # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 2, FN 1 -> 2/3; class 2: TP 1, FP 1 -> 1/2
  cm = sg.confusion(pred, label, 4)
  assert cm.sum() == 6 and cm[1, 0] == 1 and cm[0, 2] == 1
  m, iou = sg.miou_from_confusion(cm)
  np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 3, 1 / 2])
  assert np.isnan(iou[3])                                 # absent everywhere: not scored
  assert m == pytest.approx(0.5)
  # label-0 pixels ignored: class 0 only a false positive (IoU 0), class 2 perfect
  assert sg.miou(pred, label, 4, ignore_index=0) == pytest.approx((0 + 2 / 3 + 1) / 3)
  # a class predicted where it never occurs counts with IoU 0
  assert sg.miou(np.array([[3, 1]]), np.array([[0, 1]]), 4) == pytest.approx(1 / 3)


def test_perfect_prediction_is_one():
  label = np.random.default_rng(0).integers(0, 35, (3, 16, 32))
  assert sg.miou(label, label, 35) == 1.0


@pytest.mark.parametrize('pred,label,match', [
    (np.zeros((2, 4, 4), int), np.zeros((2, 4, 5), int), 'one shape'),
    (np.zeros((2, 4, 4), float), np.zeros((2, 4, 4), int), 'integer class ids'),
    (np.full((2, 4, 4), 35), np.zeros((2, 4, 4), int), r'expected 0\.\.34'),
    (np.zeros((4,), int), np.zeros((4,), int), 'one shape'),
])
def test_bad_inputs_one_clear_error(pred, label, match):
  with pytest.raises(sg.SegmenterError, match=match):
    sg.miou(pred, label, 35)


def test_bad_images_one_clear_error(trained):
  s = trained[2]
  with pytest.raises(sg.SegmenterError, match=r'\(B, H, W, 3\)'):
    s.predict(np.zeros((2, 31, 64, 3), np.float32))
  with pytest.raises(sg.SegmenterError, match=r'\(B, H, W, 3\)'):
    s.predict(np.zeros((2, 64, 64), np.float32))

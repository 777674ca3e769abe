"""Inference: one input, batched routing == per input, the sweep report, bad inputs."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fiancee_jax import infer_lib

from fiancee_jax.core import routing
from tests.test_train_predictor import pipeline, tiny_config, tiny_workdir


@pytest.mark.parametrize('bad', [0, -0.1, float('nan'), float('inf'), 'abc'])
def test_bad_threshold(bad):
  with pytest.raises(infer_lib.InferError, match='threshold'):
    infer_lib.check_threshold(bad)


def test_bad_label_png(tmp_path):
  c = tiny_config()
  wrong = tmp_path / 'wrong.png'
  Image.fromarray(np.zeros((32, 48), np.uint8)).save(wrong)
  with pytest.raises(infer_lib.InferError, match='size 32x48'):
    infer_lib.read_label(str(wrong), c)
  unknown = tmp_path / 'unknown.png'
  ids = np.zeros((c.data.height, c.data.width), np.uint8)
  ids[3, 4] = 200
  Image.fromarray(ids).save(unknown)
  with pytest.raises(infer_lib.InferError, match=r'unknown class ids \[200\]'):
    infer_lib.read_label(str(unknown), c)
  ok = tmp_path / 'ok.png'
  ids[3, 4] = 7
  Image.fromarray(ids).save(ok)
  assert infer_lib.read_label(str(ok), c)[3, 4] == 7


def test_missing_stage(tmp_path):
  c = tiny_config()
  with pytest.raises(ValueError, match='backbone.*train.py'):
    infer_lib.load(c, str(tmp_path))


@pipeline
def test_single_input(tmp_path):
  c = tiny_config()
  wd = tiny_workdir()
  out = str(tmp_path / 'one.png')
  info = infer_lib.infer_file(c, wd, index=1, noise_seed=3, threshold=0.3, verify=True, out=out,
                              repeats=1)
  img = np.asarray(Image.open(out))
  assert img.shape == (c.data.height, c.data.width, 3)
  for key in ('exit', 'route', 'pred_lpips', 'true_lpips', 'gmacs', 'latency_ms', 'device'):
    assert key in info
  json.dumps(info)
  pl = infer_lib.load(c, wd)
  pred = np.array(list(info['pred_lpips'].values()))
  assert info['route'] == int(routing.choose_exit(pred, 0.3, pl.costs))
  assert info['gmacs'] == pytest.approx(float(pl.costs[info['route']]))
  if info['exit'] == 'backbone':
    assert info['true_lpips'] == 0.0
  else:
    assert info['true_lpips'] == pytest.approx(info['true_lpips_all'][f'exit{info["exit"]}'],
                                               rel=1e-4)


@pipeline
def test_batched_routing_equals_per_input():
  from fiancee_jax import fiancee
  from fiancee_jax.train import predictor as tp
  c = tiny_config()
  wd = tiny_workdir()
  pl = infer_lib.load(c, wd)
  rows = tp.dataset(c, wd, 'test')
  labels = tp.load_labels(c, wd, 'test', rows['maps'][:4])
  z = rows['z'][:4]
  pred = tp.predict(pl.predictor, pl.params['predictor']['params'], rows['feats'][:4])
  # Between the 2nd and 3rd smallest exit-1 predictions: two inputs take the cheapest exit,
  # the other two go further (another exit or the backbone).
  # (An untrained tiny predictor may predict negative values: route at t = 1 with an offset.)
  p0 = np.sort(np.asarray(pred)[:, 0])
  assert p0[1] < p0[2], p0
  offset = 1.0 - float(p0[1] + p0[2]) / 2
  images, exits = infer_lib.routed_batch(pl, labels, z, 1.0, offset=offset, bucket_sizes=(1, 4))
  assert len(set(exits.tolist())) >= 2, exits
  routes = fiancee.route_fns(pl)
  for i in range(4):
    seg = jax.nn.one_hot(labels[i:i + 1], c.data.num_classes)
    one = routes[exits[i]](pl.params, seg, jnp.asarray(z[i:i + 1]))
    np.testing.assert_allclose(np.asarray(images[i]), np.asarray(one[0]), atol=1e-4)


@pipeline
def test_sweep_report(tmp_path):
  c = tiny_config()
  wd = tiny_workdir()
  out = str(tmp_path / 'report')
  s = infer_lib.sweep(c, wd, thresholds=(0.05, 0.2, 0.5, 1.0), out_dir=out, repeats=1)
  for key in ('threshold', 'mean_lpips', 'violation_rate', 'gmacs_share', 'latency_speedup',
              'device'):
    assert key in s
  assert 0 < s['gmacs_share'] <= 1 and 0 <= s['violation_rate'] <= 1
  assert math.isfinite(s['latency_speedup']) and s['latency_speedup'] > 0
  with open(os.path.join(out, 'summary.json')) as f:
    assert json.load(f)['threshold'] == s['threshold']
  from fiancee_jax import report
  for name in report.FIGURES + ('report.md',):
    assert os.path.getsize(os.path.join(out, name)) > 0, name

"""Head-avatar inference (infer_lib on a megaportraits config): bad inputs end in one message,
batched routing == per input == the one-pass images, one (source, driver) pair -> JSON + PNG,
the sweep report (Figs. 5, 6, 7, 10) with the OASIS summary keys."""
import json
import math
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fiancee_jax import fiancee, fiancee_heads, infer_lib, report

from fiancee_jax.core import routing
from fiancee_jax.train import predictor as tp
from tests.test_fiancee_heads import heads_config
from tests.test_report import _result as oasis_result
from tests.test_train_predictor_heads import _workdir

SUMMARY_KEYS = ('threshold', 'mean_lpips', 'violation_rate', 'gmacs_share', 'latency_speedup',
                'device')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(config, workdir, pipeline): the shared tiny head backbone, its frame banks, branches as
  the branches stage saves them, and the predictor trained by its own stage function."""
  c, wd = _workdir(tmp_path_factory.mktemp('infer_heads'), tmp_path_factory)
  tp.train_and_evaluate(c, wd)
  return c, wd, infer_lib.load(c, wd)


def _png(path, array):
  Image.fromarray(np.asarray(array, np.uint8)).save(path)
  return str(path)


# ------------------------------------------------------------------------ cheap, always on

@pytest.mark.parametrize('bad', [0, -0.1, float('nan'), 'nan'])
def test_bad_threshold_before_any_stage(tmp_path, bad):
  with pytest.raises(infer_lib.InferError, match='threshold'):
    infer_lib.infer_file(heads_config(), str(tmp_path / 'none'), source_index=0, driver_index=1,
                         threshold=bad)


def test_bad_images_and_flags(tmp_path):
  c = heads_config(tmp_path / 'data')
  size = c.data.height
  small = _png(tmp_path / 'small.png', np.zeros((16, 24, 3)))
  ok = _png(tmp_path / 'ok.png', np.full((size, size, 3), 200))
  with pytest.raises(infer_lib.InferError, match=rf'--driver=.*size 16x24 .*expects {size}x'):
    infer_lib.read_image(small, c, 'driver')
  with pytest.raises(infer_lib.InferError, match='--source=.*no such file'):
    infer_lib.read_image(str(tmp_path / 'missing.png'), c, 'source')
  grey = _png(tmp_path / 'grey.png', np.full((size, size), 7))
  assert infer_lib.read_image(grey, c, 'source').shape == (size, size, 3)
  kw = dict(source=None, driver=ok, source_index=None, driver_index=None, identity=None)
  with pytest.raises(infer_lib.InferError, match='exactly one of --source'):
    infer_lib.pair_inputs(c, str(tmp_path), **kw)
  with pytest.raises(infer_lib.InferError, match='needs --identity'):
    infer_lib.pair_inputs(c, str(tmp_path), **dict(kw, source=ok))
  with pytest.raises(infer_lib.InferError, match='exactly one of --driver'):
    infer_lib.pair_inputs(c, str(tmp_path), **dict(kw, source=ok, identity=1, driver_index=0))
  src, drv, ident, name = infer_lib.pair_inputs(c, str(tmp_path), **dict(kw, source=ok,
                                                                          identity=4))
  assert ident == 4 and name == 'ok_by_ok' and src.dtype == np.uint8
  with pytest.raises(infer_lib.InferError, match='head-avatar config.*not --label'):
    infer_lib.infer_file(c, str(tmp_path), label=ok)
  with pytest.raises(infer_lib.InferError, match=r'--identity=99: .*one of \[0, 1, 2, 3, 4\]'):
    infer_lib.check_identity(c, str(tmp_path), 99)


def test_missing_stage_names_the_command(tmp_path):
  c = heads_config(tmp_path / 'data')
  img = _png(tmp_path / 'x.png', np.zeros((c.data.height, c.data.width, 3)))
  wd = tmp_path / 'wd'
  wd.mkdir()
  with pytest.raises(fiancee.PipelineError, match=r'no backbone.*train\.py .*--stage=backbone'):
    infer_lib.infer_file(c, str(wd), source=img, identity=4, driver=img)


def test_rotation_angle_numbers():
  deg = fiancee_heads.rotation_angle
  np.testing.assert_allclose(deg(np.zeros((1, 3))), [0.0], atol=1e-6)
  np.testing.assert_allclose(deg([[30, 0, 0], [0, -20, 0], [0, 0, 15]]), [30, 20, 15], atol=1e-6)
  # relative: yaw 30 vs yaw -10 is 40 degrees apart; a pose vs itself 0
  np.testing.assert_allclose(deg([[30, 0, 0], [12, -7, 5]], [[-10, 0, 0], [12, -7, 5]]),
                             [40, 0], atol=1e-4)
  # yaw and pitch together rotate further than either alone
  assert deg([[30, 20, 0]])[0] > 30


def test_heads_report_from_synthetic_result(tmp_path):
  res = oasis_result()
  n = len(res['true'])
  rng = np.random.default_rng(1)
  imgs = res['samples']['exits']
  res.update(kind='heads', rotation={
      'angle_source': 'ground-truth pose', 'driver_angle': rng.uniform(0, 45, n),
      'key_angle': rng.uniform(0, 30, n), 'exits_taken': rng.integers(0, 3, n).tolist(),
      'threshold': 0.1})
  res['samples'] = {'inputs': [('source', imgs[0]), ('driver', imgs[1]),
                               ('bank frame', imgs[2])],
                    'exits': imgs, 'routed': imgs[1], 'routed_exit': [1, 2]}
  paths = report.write(str(tmp_path), res)
  assert set(report.HEADS_FIGURES) >= {'fig7_exits_gmacs.png', 'fig6_quality_compute.png',
                                       'fig10_exits_vs_rotation.png', 'samples.png'}
  for name in report.HEADS_FIGURES:
    assert os.path.getsize(paths[name]) > 1000, name
  md = open(paths['report']).read()
  taken = np.asarray(res['rotation']['exits_taken'])
  assert '## Routes vs head rotation (Fig. 10)' in md
  assert f'| exit 1 | {int((taken == 0).sum())} | ' in md
  # samples: 3 input columns + backbone + 2 exits + routed, 2 rows
  h, w = imgs[0].shape[1:3]
  assert np.asarray(Image.open(paths['samples.png'])).shape == (2 * h, 7 * w, 3)
  assert not [f for f in os.listdir(tmp_path) if '.tmp' in f]


# ------------------------------------------------------------------------ tiny trained workdir

def _test_inputs(c, wd, n=None):
  rows = tp.dataset(c, wd, 'test')
  inputs, extra = infer_lib._sweep_inputs(c, wd, rows)  # noqa: SLF001
  return rows, inputs if n is None else tuple(x[:n] for x in inputs), extra


def test_batched_routing_equals_per_input(trained):
  c, wd, pl = trained
  rows, inputs, _ = _test_inputs(c, wd, 4)
  pred = tp.predict(pl.predictor, pl.params['predictor']['params'], rows['feats'][:4])
  # (An untrained tiny predictor may predict anything: route at t = 1 with an offset between
  # the 2nd and 3rd smallest exit-4 predictions: two inputs take exit 4, two go further.)
  p0 = np.sort(np.asarray(pred)[:, 0])
  assert p0[1] < p0[2], p0
  offset = 1.0 - float(p0[1] + p0[2]) / 2
  images, exits = infer_lib.routed_rows(pl, inputs, 1.0, offset=offset, bucket_sizes=(1, 4))
  assert (exits == 0).sum() == 2 and len(set(exits.tolist())) >= 2, exits
  np.testing.assert_array_equal(exits, routing.choose_exit(pred, 1.0, pl.costs, offset))
  fns = infer_lib._jitted(pl)  # noqa: SLF001
  every = fns['all'](pl.params, *inputs)          # all routes in one pass (backbone once)
  for i in range(4):
    one = tuple(jnp.asarray(x[i:i + 1]) for x in inputs)
    alone = fns['routes'][exits[i]](pl.params, *one)
    np.testing.assert_allclose(np.asarray(images[i]), np.asarray(alone[0]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(images[i]), np.asarray(every[exits[i]][i]), atol=1e-4)
    routed, info = infer_lib.route_one(pl, one, 1.0, offset=offset, repeats=1)
    assert info['route'] == exits[i]
    np.testing.assert_allclose(routed, np.asarray(images[i]), atol=1e-4)


def test_single_pair_json_and_png(trained, tmp_path):
  c, wd, pl = trained
  out = str(tmp_path / 'one.png')
  info = infer_lib.infer_file(c, wd, source_index=0, driver_index=3, threshold=0.3, verify=True,
                              out=out, repeats=1, pipeline=pl)
  json.dumps(info)
  for key in ('exit', 'route', 'pred_lpips', 'pred_lpips_chosen', 'true_lpips', 'gmacs',
              'gmacs_share', 'latency_ms', 'device', 'identity', 'image'):
    assert key in info, key
  img = np.asarray(Image.open(out))
  assert img.shape == (c.data.height, c.data.width, 3)
  pred = np.array(list(info['pred_lpips'].values()))
  assert len(pred) == len(pl.exits)
  assert info['route'] == int(routing.choose_exit(pred, 0.3, pl.costs))
  assert info['gmacs'] == pytest.approx(float(pl.costs[info['route']]))
  chosen = info['true_lpips_all'].get(f'exit{info["exit"]}', 0.0)   # backbone: 0
  assert info['true_lpips'] == pytest.approx(chosen, rel=1e-4)
  # the same pair as PNG files + --identity, through infer.py's own loading (its bank only)
  imgs, ids, _ = infer_lib.split_frames(c, wd, 'test', [0, 3])
  src, drv = _png(tmp_path / 's.png', imgs[0]), _png(tmp_path / 'd.png', imgs[1])
  out2 = str(tmp_path / 'two.png')
  info2 = infer_lib.infer_file(c, wd, source=src, driver=drv, identity=int(ids[0]),
                               threshold=0.3, out=out2, repeats=1)
  assert info2['route'] == info['route'] and info2['identity'] == info['identity'] == ids[0]
  np.testing.assert_allclose(list(info2['pred_lpips'].values()), pred, rtol=1e-5, atol=1e-6)
  # Another bank stack (the identity's bank only) compiles another program: the float image may
  # differ in its last bits, so a pixel may round to the next uint8 level, never further.
  np.testing.assert_allclose(np.asarray(Image.open(out2), np.int16), img.astype(np.int16), atol=1)


def test_missing_predictor_names_its_stage(trained, tmp_path):
  c, wd, _ = trained
  wd2 = str(tmp_path / 'wd')
  shutil.copytree(wd, wd2, ignore=lambda d, names: ['predictor'] if d.endswith(
      'checkpoints') else [])
  with pytest.raises(fiancee.PipelineError, match=r'no predictor checkpoint.*--stage=predictor'):
    infer_lib.infer_file(c, wd2, source_index=0, driver_index=1, threshold=0.1)


def test_sweep_report(trained, tmp_path):
  c, wd, pl = trained
  out = str(tmp_path / 'report')
  s = infer_lib.sweep(c, wd, thresholds=(0.05, 0.2, 0.5, 1.0), out_dir=out, repeats=1,
                      pipeline=pl)
  for key in SUMMARY_KEYS:
    assert key in s, key
  assert 0 < s['gmacs_share'] <= 1 and 0 <= s['violation_rate'] <= 1
  assert math.isfinite(s['latency_speedup']) and s['latency_speedup'] > 0
  with open(os.path.join(out, 'summary.json')) as f:
    saved = json.load(f)
  assert saved['threshold'] == s['threshold'] and saved['config'] == c.name
  for name in report.HEADS_FIGURES + ('report.md',):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  # Fig. 10: the drivers' ground-truth rotation and the routes taken, one per test row
  with open(os.path.join(out, 'sweep.json')) as f:
    rot = json.load(f)['rotation']
  rows, inputs, extra = _test_inputs(c, wd)
  assert rot['angle_source'] == 'ground-truth pose'
  np.testing.assert_allclose(rot['driver_angle'],
                             fiancee_heads.rotation_angle(extra['driver_pose']), atol=1e-6)
  assert len(rot['exits_taken']) == len(rows['targets']) == len(rot['key_angle'])
  assert all(0 <= a <= 180 for a in rot['key_angle'])

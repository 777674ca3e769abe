"""Head-avatar inference on the tiny trained workdir (one module: the workdir is built once):
batched routing == per input == the one-pass images == one routed call, one (source, driver)
pair -> JSON + PNG, a missing stage names its command, the sweep report (Figs. 5, 6, 7, 10)
with the OASIS summary keys."""
import json
import math
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fiancee_jax import registry
from fiancee_jax.backbones.megaportraits import frame_banks
from fiancee_jax.core import predictor_data, routing
from fiancee_jax.core.pipeline import PipelineError
from fiancee_jax.infer import engine as engine_lib
from fiancee_jax.infer import inputs, report, sweep
from fiancee_jax.train import predictor as tp
from tests.conftest import heads_config, heads_predictor_workdir

SUMMARY_KEYS = ('threshold', 'mean_lpips', 'violation_rate', 'gmacs_share', 'latency_speedup',
                'device')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(backbone adapter, workdir, engine): the shared tiny head backbone, its frame banks,
  freshly initialised branches saved as the branches stage saves them, and the predictor
  trained by its own stage function (few rows: LPIPS dominates the time on CPU)."""
  _, bb, wd = heads_predictor_workdir(
      tmp_path_factory, str(tmp_path_factory.mktemp('infer_heads') / 'wd'))
  tp.train_and_evaluate(bb, wd)
  return bb, wd, engine_lib.Engine(engine_lib.load(bb, wd))


def _png(path, array):
  Image.fromarray(np.asarray(array, np.uint8)).save(path)
  return str(path)


def _test_inputs(bb, wd, n=None):
  rows = predictor_data.dataset(bb, wd, 'test')
  x, extra = bb.infer_inputs().from_rows(wd, rows)
  return rows, x if n is None else tuple(a[:n] for a in x), extra


# ------------------------------------------------------------------------ cheap, always on

def test_rotation_angle_numbers():
  deg = frame_banks.rotation_angle
  np.testing.assert_allclose(deg(np.zeros((1, 3))), [0.0], atol=1e-6)
  np.testing.assert_allclose(deg([[30, 0, 0], [0, -20, 0], [0, 0, 15]]), [30, 20, 15], atol=1e-6)
  # relative: yaw 30 vs yaw -10 is 40 degrees apart; a pose vs itself 0
  np.testing.assert_allclose(deg([[30, 0, 0], [12, -7, 5]], [[-10, 0, 0], [12, -7, 5]]),
                             [40, 0], atol=1e-4)
  # yaw and pitch together rotate further than either alone
  assert deg([[30, 20, 0]])[0] > 30


def test_missing_stage_names_the_command(tmp_path):
  c = heads_config(tmp_path / 'data')
  img = _png(tmp_path / 'x.png', np.zeros((c.data.height, c.data.width, 3)))
  wd = tmp_path / 'wd'
  wd.mkdir()
  with pytest.raises(PipelineError, match=r'no backbone.*train\.py .*--stage=backbone'):
    engine_lib.infer_file(registry.get(c), str(wd), source=img, identity=4, driver=img)


# ------------------------------------------------------------------------ tiny trained workdir

def test_batched_routing_equals_per_input(trained):
  bb, wd, eng = trained
  rows, x, _ = _test_inputs(bb, wd, 4)
  pl_ = eng.pipeline
  pred = tp.predict(pl_.predictor, pl_.params['predictor']['params'], rows['feats'][:4])
  # (An untrained tiny predictor may predict anything: route at t = 1 with an offset between
  # the 2nd and 3rd smallest exit-4 predictions: two inputs take exit 4, two go further.)
  p0 = np.sort(np.asarray(pred)[:, 0])
  assert p0[1] < p0[2], p0
  offset = 1.0 - float(p0[1] + p0[2]) / 2
  images, exits = eng.routed_batch(x, 1.0, offset=offset, bucket_sizes=(1, 4))
  assert (exits == 0).sum() == 2 and len(set(exits.tolist())) >= 2, exits
  np.testing.assert_array_equal(exits, routing.choose_exit(pred, 1.0, eng.costs, offset))
  every, _ = eng.all(eng.params, *x)          # all routes in one pass (backbone once)
  for i in range(4):
    one = tuple(jnp.asarray(a[i:i + 1]) for a in x)
    alone = eng.routes[exits[i]](eng.params, *one)
    np.testing.assert_allclose(np.asarray(images[i]), np.asarray(alone[0]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(images[i]), np.asarray(every[exits[i]][i]), atol=1e-4)
    routed, info = engine_lib.route_one(eng, one, 1.0, offset=offset, repeats=1)
    assert info['route'] == exits[i]
    np.testing.assert_allclose(routed, np.asarray(images[i]), atol=1e-4)


def test_single_pair_json_and_png(trained, tmp_path):
  bb, wd, eng = trained
  c = bb.config
  out = str(tmp_path / 'one.png')
  info = engine_lib.infer_file(bb, wd, source_index=0, driver_index=3, threshold=0.3,
                               verify=True, out=out, repeats=1, engine=eng)
  json.dumps(info)
  for key in ('exit', 'route', 'pred_lpips', 'pred_lpips_chosen', 'true_lpips', 'gmacs',
              'gmacs_share', 'latency_ms', 'device', 'identity', 'image'):
    assert key in info, key
  img = np.asarray(Image.open(out))
  assert img.shape == (c.data.height, c.data.width, 3)
  pred = np.array(list(info['pred_lpips'].values()))
  assert len(pred) == len(eng.exits)
  assert info['rule'] == 'calibrated' and info['alpha'] == c.routing.alpha   # the default
  assert info['route'] == int(routing.choose_exit(pred, 0.3, eng.costs, info['offset']))
  assert info['gmacs'] == pytest.approx(float(eng.costs[info['route']]))
  chosen = info['true_lpips_all'].get(f'exit{info["exit"]}', 0.0)   # backbone: 0
  assert info['true_lpips'] == pytest.approx(chosen, rel=1e-4)
  # the same pair as PNG files + --identity, through infer.py's own loading (its bank only)
  imgs, ids, _ = inputs.split_frames(c, wd, 'test', [0, 3])
  src, drv = _png(tmp_path / 's.png', imgs[0]), _png(tmp_path / 'd.png', imgs[1])
  out2 = str(tmp_path / 'two.png')
  info2 = engine_lib.infer_file(bb, wd, source=src, driver=drv, identity=int(ids[0]),
                                threshold=0.3, out=out2, repeats=1)
  assert info2['route'] == info['route'] and info2['identity'] == info['identity'] == ids[0]
  np.testing.assert_allclose(list(info2['pred_lpips'].values()), pred, rtol=1e-5, atol=1e-6)
  # Another bank stack (the identity's bank only) compiles another program: the float image may
  # differ in its last bits, so a pixel may round to the next uint8 level, never further.
  np.testing.assert_allclose(np.asarray(Image.open(out2), np.int16), img.astype(np.int16), atol=1)


def test_missing_predictor_names_its_stage(trained, tmp_path):
  bb, wd, _ = trained
  wd2 = str(tmp_path / 'wd')
  shutil.copytree(wd, wd2, ignore=lambda d, names: ['predictor'] if d.endswith(
      'checkpoints') else [])
  with pytest.raises(PipelineError, match=r'no predictor checkpoint.*--stage=predictor'):
    engine_lib.infer_file(bb, wd2, source_index=0, driver_index=1, threshold=0.1)


def test_sweep_report(trained, tmp_path):
  bb, wd, eng = trained
  out = str(tmp_path / 'report')
  s = sweep.sweep(bb, wd, thresholds=(0.05, 0.2, 0.5, 1.0), out_dir=out, repeats=1, engine=eng)
  for key in SUMMARY_KEYS:
    assert key in s, key
  assert 0 < s['gmacs_share'] <= 1 and 0 <= s['violation_rate'] <= 1
  assert math.isfinite(s['latency_speedup']) and s['latency_speedup'] > 0
  with open(os.path.join(out, 'summary.json')) as f:
    saved = json.load(f)
  assert saved['threshold'] == s['threshold'] and saved['config'] == bb.config.name
  for name in report.HEADS_FIGURES + ('report.md',):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  # Fig. 10: the drivers' ground-truth rotation and the routes taken, one per test row
  with open(os.path.join(out, 'sweep.json')) as f:
    rot = json.load(f)['rotation']
  rows, _, extra = _test_inputs(bb, wd)
  assert rot['angle_source'] == 'ground-truth pose'
  np.testing.assert_allclose(rot['driver_angle'],
                             frame_banks.rotation_angle(extra['driver_pose']), atol=1e-6)
  assert len(rot['exits_taken']) == len(rows['targets']) == len(rot['key_angle'])
  assert all(0 <= a <= 180 for a in rot['key_angle'])

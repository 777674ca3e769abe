"""The whole FIANCEE core on a backbone it has never seen (tests/toy_backbone.py: an
unconditional noise-to-image decoder without a bank), through the stages' public drivers:
backbone GAN stage, branch stage (unguided), predictor stage, routed inference (one input and
a batch) and the threshold sweep. Nothing under fiancee_jax/ knows the toy."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax import registry
from fiancee_jax import workdir as wd
from fiancee_jax.core import pipeline as pl
from fiancee_jax.core import stages
from fiancee_jax.infer import engine as engine_lib
from fiancee_jax.infer import sweep as sweep_lib
from fiancee_jax.infer.inputs import InferError
from fiancee_jax.train import branches, checkpoint, gan, predictor
from tests import toy_backbone as toy

registry.register(toy.Toy)

THRESHOLDS = (0.05, 0.1, 0.3, 0.6)


def _config(data_dir):
  c = toy.base_config()
  c.model.num_blocks = 3                         # 32x32 images, exits after blocks 1 and 2
  c.model.ch = 8
  c.data.height = c.data.width = 32
  c.data.data_dir = str(data_dir)
  c.data.num_train, c.data.num_validation, c.data.num_test = 8, 4, 4
  c.train.batch_size = 4                         # divides by the 4 test devices
  c.train.num_steps = 2
  c.train.log_every = c.train.sample_every = c.train.ckpt_every = 2
  c.train.bn_refresh_batches = 1
  c.branches.batch_size = 4
  c.branches.num_steps = 2
  c.branches.log_every = c.branches.sample_every = c.branches.ckpt_every = 2
  c.predictor.num_train, c.predictor.num_noises = 4, 2     # 8 train rows
  c.predictor.num_validation, c.predictor.num_test = 8, 8  # 4 validation, 4 calibration
  c.predictor.batch_size = 4
  c.predictor.num_steps = 4
  c.routing.bucket_sizes = (1, 4)
  return c


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """Every stage of the toy in one workdir, each through its driver."""
  root = tmp_path_factory.mktemp('toy')
  bb = registry.get(_config(root / 'data'))
  workdir = str(root / 'wd')
  out = {'bb': bb, 'wd': workdir}
  out['gan'] = gan.train_and_evaluate(bb, workdir)
  out['branches'] = branches.train_and_evaluate(bb, workdir)
  out['predictor'] = predictor.train_and_evaluate(bb, workdir)
  eng = engine_lib.Engine(stages.load_pipeline(bb, workdir))
  out['engine'] = eng
  out['summary'] = sweep_lib.sweep(bb, workdir, thresholds=THRESHOLDS, repeats=1,
                                   out_dir=str(root / 'report'), engine=eng)
  out['report'] = str(root / 'report')
  return out


def test_every_stage_checkpoints(run):
  bb, workdir = run['bb'], run['wd']
  assert isinstance(bb, toy.Toy) and not bb.has_bank
  assert checkpoint.finished_steps(workdir, 'backbone') == [2]
  assert checkpoint.finished_steps(workdir, 'branches_nobank') == [2]
  assert checkpoint.finished_steps(workdir, 'predictor') == [4]
  assert not os.path.exists(wd.checkpoint_dir(workdir, 'branches'))   # unguided only
  assert int(run['gan'].step) == 2 and int(run['branches'].step) == 2
  assert int(run['predictor']['step']) == 4
  for name in ('step_0000002.png', 'branches_nobank_0000002.png'):
    assert os.path.getsize(os.path.join(workdir, 'samples', name)) > 0
  for split in ('train', 'validation', 'calibration', 'test'):
    assert os.path.exists(os.path.join(wd.predictor_dir(workdir), f'dataset_{split}.npz'))
  # the stages trained, and what inference loads is what they saved
  p = run['engine'].pipeline

  def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert same(p.params['generator']['params'], run['gan'].ema_params_g)
  assert same(p.params['branches']['params'], run['branches'].params_b)
  assert same(p.params['predictor']['params'], run['predictor']['params'])
  assert not same(run['gan'].params_g, gan.create_train_state(bb).params_g)


def test_predictor_rows_are_the_exits_lpips(run):
  """A row's target is LPIPS(exit image, backbone image) of its noise, its input the prefix's
  pred_in; train rows are fixed noises, the held-out splits fresh ones."""
  from fiancee_jax.core import predictor_data
  from fiancee_jax.metrics import lpips as lpips_lib
  bb, workdir, p = run['bb'], run['wd'], run['engine'].pipeline
  rows = {s: predictor_data.dataset(bb, workdir, s, p) for s in predictor_data.SPLITS}
  assert [len(rows[s]['z']) for s in predictor_data.SPLITS] == [8, 4, 4, 8]
  zs = np.concatenate([rows[s]['z'] for s in predictor_data.SPLITS])
  assert len(np.unique(zs, axis=0)) == len(zs)      # no noise shared between splits
  t = rows['test']
  out = pl.all_images(p, p.params, jnp.asarray(t['z'][:2]))
  lp = lpips_lib.load()
  for e, k in enumerate(p.exits):
    np.testing.assert_allclose(t['targets'][:2, e], lp(out[k], out['backbone']), atol=1e-4)
  np.testing.assert_allclose(t['feats'][:2], out['pred_in'], atol=1e-5)


def _rule(pred, threshold, offset, costs):
  """The cheapest exit whose predicted LPIPS (+ offset) <= threshold, else the backbone."""
  ok = [i for i in range(len(pred)) if pred[i] + offset <= threshold]
  return min(ok, key=lambda i: (costs[i], i)) if ok else len(pred)


def test_routed_input_is_its_route_and_follows_the_rule(run):
  bb, eng = run['bb'], run['engine']
  p, params = eng.pipeline, eng.params
  req = bb.infer_inputs().from_flags(run['wd'], {'noise_seed': 3})
  (z,) = req.inputs
  assert z.shape == (1, bb.config.model.z_dim)
  with pytest.raises(InferError, match='unconditional'):
    bb.infer_inputs().from_flags(run['wd'], {'label': 'x.png'})
  pred = np.asarray(eng.predict(params, z))[0]
  np.testing.assert_allclose(pred, np.asarray(pl.predict(p, params, pl.prefix(p, params, z)))[0],
                             atol=1e-6)
  fns = [jax.jit(f) for f in pl.route_fns(p)]
  t = 0.5
  # offsets so the rule picks: every exit feasible, each prediction the limit, none feasible
  offsets = [t - pred.max() - 0.05] + [t - v - 1e-4 for v in sorted(pred)] + \
      [t - pred.min() + 0.05]
  seen = set()
  for off in offsets:
    image, info = engine_lib.route_one(eng, (z,), t, offset=float(off), repeats=1)
    want = _rule(pred, t, off, eng.costs)
    assert info['route'] == want, (pred, off, info)
    assert info['exit'] == ('backbone' if want == len(p.exits) else p.exits[want])
    np.testing.assert_allclose([info['pred_lpips'][f'exit{k}'] for k in p.exits], pred,
                               atol=1e-5)
    np.testing.assert_allclose(image, np.asarray(fns[want](params, z))[0], atol=1e-5)
    assert info['gmacs'] == pytest.approx(eng.costs[want])
    seen.add(want)
  assert {0, len(p.exits)} <= seen      # both an exit and the backbone were taken


def test_routed_batch_is_each_rows_route(run):
  eng = run['engine']
  p, params = eng.pipeline, eng.params
  z = jnp.asarray(toy.noises(run['bb'].config, 'eval', 6))
  pred = np.asarray(eng.predict(params, z))
  t = 0.5
  off = float(t - np.median(pred))            # a threshold inside the predictions' range
  images, exits = eng.routed_batch((z,), t, off)
  assert images.shape == (6, 32, 32, 3)
  assert exits.tolist() == [_rule(pred[i], t, off, eng.costs) for i in range(6)]
  fns = [jax.jit(f) for f in pl.route_fns(p)]
  for i, r in enumerate(exits):
    np.testing.assert_allclose(np.asarray(images[i]), np.asarray(fns[r](params, z[i:i + 1]))[0],
                               atol=1e-5)


def test_sweep_reports_every_threshold_at_the_backbones_costs(run):
  bb, summary, out = run['bb'], run['summary'], run['report']
  costs = bb.route_costs(False)
  assert len(costs) == len(bb.exits) + 1 and np.all(np.diff(costs) > 0)
  with open(os.path.join(out, 'sweep.json')) as f:
    sw = json.load(f)
  with open(os.path.join(out, 'summary.json')) as f:
    assert json.load(f)['threshold'] == summary['threshold']
  assert [r['threshold'] for r in sw['rows']] == list(THRESHOLDS)
  np.testing.assert_allclose(sw['costs'], costs, rtol=1e-9)
  np.testing.assert_allclose(run['engine'].costs, costs, rtol=1e-9)
  assert sw['exits'] == list(bb.exits)
  n = summary['num_test']
  assert n == bb.config.predictor.num_test
  for r in sw['rows']:
    for pre in ('', 'calibrated_'):
      counts = np.asarray(r[pre + 'exit_counts'])
      assert len(counts) == len(costs) and counts.sum() == n
      assert r[pre + 'mean_gmacs'] == pytest.approx(float(counts @ costs) / n)
  assert summary['backbone_gmacs'] == pytest.approx(costs[-1])
  assert summary['threshold'] in THRESHOLDS
  assert os.path.getsize(summary['report']) > 0
  assert os.path.getsize(os.path.join(out, 'samples.png')) > 0

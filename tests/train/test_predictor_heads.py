"""Head-avatar predictor stage (train.py --stage=predictor, megaportraits) end to end on the
tiny config: rows = (source, driver of another identity), inputs = the driver's motion key,
targets = LPIPS of every exit vs the backbone (checked against a direct computation), the
predictor trains, is evaluated per exit, checkpointed and loaded by the pipeline."""
import json
import os

import jax
import numpy as np

from fiancee_jax import data as fdata
from fiancee_jax.core import pipeline as pl
from fiancee_jax.core import predictor_data, stages
from fiancee_jax.metrics import lpips
from fiancee_jax.train import predictor as tp
from tests.conftest import heads_predictor_workdir


def _workdir(tmp_path, tmp_path_factory):
  """The shared random backbone + its frame banks + freshly initialised branches saved as the
  branches stage saves them (the predictor only needs some trained-or-not exits)."""
  return heads_predictor_workdir(tmp_path_factory, str(tmp_path / 'wd'))


def test_predictor_stage_end_to_end(tmp_path, tmp_path_factory):
  c, bb, wd = _workdir(tmp_path, tmp_path_factory)
  host = tp.train_and_evaluate(bb, wd)
  assert int(host['step']) == c.predictor.num_steps
  k = c.predictor.num_noises
  rows = predictor_data.dataset(bb, wd, 'test')          # the stage's cache
  n, e = rows['targets'].shape
  assert n == c.predictor.num_test * k and e == 2
  assert rows['feats'].shape == (n,) + tp.input_shape(bb) == (n, 3 + c.model.expr_dim)
  src = fdata.source(c.data, 'test', c.data.data_dir)
  val = fdata.source(c.data, 'validation', c.data.data_dir)
  # test split = one identity: drivers come from it; validation drivers likewise
  assert set(rows['drivers'].tolist()) <= set(range(len(src)))
  # targets = LPIPS(exit, backbone) of the routes, inputs = the driver's motion key
  p = stages.load_pipeline(bb, wd, stages=('backbone', 'bank', 'branches', 'predictor'))
  i = [0, n - 1]
  pm1 = lambda idx: np.stack([src[int(j)]['image'] for j in idx]).astype(np.float32) / 127.5 - 1
  ident = np.array([int(src[int(j)]['identity']) for j in rows['sources'][i]])

  @jax.jit
  def routes(params, source, driver, identity):
    out = pl.all_images(p, params, source, driver, identity)
    return [out[x] for x in p.exits + ('backbone', 'pred_in')]

  *exits, backbone, motion = routes(p.params, pm1(rows['sources'][i]), pm1(rows['drivers'][i]),
                                    ident)
  lp = lpips.load()
  direct = np.stack([np.asarray(lp(x, backbone)) for x in exits], 1)
  np.testing.assert_allclose(rows['targets'][i], direct, rtol=1e-3, atol=1e-4)
  assert np.all(direct > 0)                  # untrained exits differ from the backbone
  np.testing.assert_allclose(rows['feats'][i], np.asarray(motion), rtol=1e-4, atol=1e-4)
  # the validation set is split into validation / calibration sources, K drivers each
  v = predictor_data.dataset(bb, wd, 'validation')
  cal = predictor_data.dataset(bb, wd, 'calibration')
  assert len(v['sources']) + len(cal['sources']) == c.predictor.num_validation * k
  assert not set(v['sources'].tolist()) & set(cal['sources'].tolist())
  assert max(v['drivers'].max(), cal['drivers'].max()) < len(val)
  # evaluation (Table S6 layout) and the checkpoint the pipeline loads
  with open(os.path.join(tp.stage_dir(wd), 'eval.json')) as f:
    ev = json.load(f)
  assert ev['exits'] == [4, 6]
  for split in ('validation', 'test', 'calibration'):
    assert len(ev[split]['rel_error']) == 2 and np.isfinite(ev[split]['mean_rel_error'])
  jax.tree.map(np.testing.assert_array_equal, p.params['predictor']['params'], host['params'])
  pred = tp.predict(p.predictor, host['params'], rows['feats'])
  np.testing.assert_allclose(ev['test']['rel_error'], tp.relative_error(pred, rows['targets']),
                             rtol=1e-6)

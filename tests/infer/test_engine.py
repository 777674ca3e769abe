"""The compiled pipeline on OASIS (trained tiny workdir, opt-in: FIANCEE_PIPELINE_TESTS=1):
one input -> JSON + PNG, batched routing == per input. Head avatars: tests/infer/test_sweep_heads.py
(its workdir is built once for the engine and the sweep)."""
import json
import time

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fiancee_jax import registry
from fiancee_jax.core import predictor_data, routing
from fiancee_jax.infer import engine as engine_lib
from fiancee_jax.infer import rules
from fiancee_jax.train import predictor as tp
from tests.conftest import tiny_config
from tests.core.test_predictor_data import pipeline, tiny_workdir


@pipeline
def test_single_input(tmp_path):
  c = tiny_config()
  bb = registry.get(c)
  wd = tiny_workdir()
  out = str(tmp_path / 'one.png')
  started = time.time()
  info = engine_lib.infer_file(bb, wd, index=1, noise_seed=3, threshold=0.3, verify=True,
                               out=out, repeats=1, started=started)
  img = np.asarray(Image.open(out))
  assert img.shape == (c.data.height, c.data.width, 3)
  for key in ('exit', 'route', 'pred_lpips', 'true_lpips', 'gmacs', 'latency_ms', 'device',
              'rule', 'offset', 'alpha', 'calibration_rows', 'time_to_first_image_s'):
    assert key in info
  json.dumps(info)
  st = info['startup']
  assert 0 < sum(v for v in st.values()) <= info['time_to_first_image_s'] <= \
      time.time() - started
  pl = engine_lib.load(bb, wd)
  # The default rule: the conformal offset for config.routing.alpha from the cached rows.
  cal = predictor_data.cached(bb, wd, 'calibration')
  pred_cal = tp.predict(pl.predictor, pl.params['predictor']['params'], cal['feats'])
  want = routing.conformal_offset(pred_cal, cal['targets'], 0.3, c.routing.alpha, pl.costs)
  assert info['rule'] == 'calibrated' and info['alpha'] == c.routing.alpha
  assert info['offset'] == pytest.approx(want, abs=1e-5) or info['offset'] == want
  pred = np.array(list(info['pred_lpips'].values()))
  assert info['route'] == int(routing.choose_exit(pred, 0.3, pl.costs, info['offset']))
  paper = engine_lib.infer_file(bb, wd, index=1, noise_seed=3, threshold=0.3, out=out,
                                repeats=1, rule=rules.check('paper'))
  assert (paper['rule'], paper['offset']) == ('paper', 0.0)
  assert paper['route'] == int(routing.choose_exit(pred, 0.3, pl.costs))
  assert info['gmacs'] == pytest.approx(float(pl.costs[info['route']]))
  if info['exit'] == 'backbone':
    assert info['true_lpips'] == 0.0
  else:
    assert info['true_lpips'] == pytest.approx(info['true_lpips_all'][f'exit{info["exit"]}'],
                                               rel=1e-4)


@pipeline
def test_batched_routing_equals_per_input():
  c = tiny_config()
  bb = registry.get(c)
  wd = tiny_workdir()
  eng = engine_lib.Engine(engine_lib.load(bb, wd))
  pl = eng.pipeline
  rows = predictor_data.dataset(bb, wd, 'test')
  labels, z = (x[:4] for x in bb.infer_inputs().from_rows(wd, rows)[0])
  pred = tp.predict(pl.predictor, pl.params['predictor']['params'], rows['feats'][:4])
  # Between the 2nd and 3rd smallest exit-1 predictions: two inputs take the cheapest exit,
  # the other two go further (another exit or the backbone).
  # (An untrained tiny predictor may predict negative values: route at t = 1e-3 with an
  # offset. Its predictions can differ by 1e-8: at t = 1, float32 could not tell them apart.)
  p0 = np.sort(np.asarray(pred)[:, 0])
  assert p0[1] < p0[2], p0
  t = 1e-3
  offset = t - float(p0[1] + p0[2]) / 2
  images, exits = eng.routed_batch((labels, z), t, offset=offset, bucket_sizes=(1, 4))
  assert len(set(exits.tolist())) >= 2, exits
  for i in range(4):
    one = eng.routes[exits[i]](pl.params, jnp.asarray(labels[i:i + 1]), jnp.asarray(z[i:i + 1]))
    np.testing.assert_allclose(np.asarray(images[i]), np.asarray(one[0]), atol=1e-4)
  # The batch-1 routing cost: the routed call forced to the cheapest route is that route.
  cost = engine_lib.routing_cost(eng, (jnp.asarray(labels[:1]), jnp.asarray(z[:1])), repeats=2)
  assert cost['forced_exit'] == cost['cheapest_route'] == 'exit1', cost
  assert cost['routed_forced_ms'] > 0 and cost['route_alone_ms'] > 0

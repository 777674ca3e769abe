"""The engine's batched routed path on the toy backbone (tests/toy_backbone.py; no stage run:
random generator, branches and predictor, which is all routing needs): images of each row ==
its route composed by hand, the prefix never recomputed, inputs sharded over the local
devices (the test session has 4 fake CPU devices), ahead-of-time programs used, budget mode
within its budget."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax import registry
from fiancee_jax.core import pipeline as pl
from fiancee_jax.core import routing
from fiancee_jax.infer import engine as engine_lib
from tests import toy_backbone as toy

registry.register(toy.Toy)


@pytest.fixture(scope='module')
def eng():
  c = toy.base_config()
  c.model.num_blocks, c.model.ch = 3, 8
  c.data.height = c.data.width = 32
  c.routing.bucket_sizes = (1, 4)
  bb = registry.get(c)
  gen, br, pr = bb.generator(), bb.branches(), bb.predictor()
  z = jnp.zeros((1, c.model.z_dim), jnp.float32)
  params = {'generator': gen.init(jax.random.key(0), z),
            'branches': pl.init_branches(bb, br, jax.random.key(1)), 'predictor': None,
            'bank': None}
  p0 = pl.Pipeline(bb, gen, br, None, params, bb.route_costs(False), bb.exits)
  params['predictor'] = pr.init(jax.random.key(2), pl.prefix(p0, params, z).pred_in)
  return engine_lib.Engine(pl.Pipeline(bb, gen, br, pr, params, bb.route_costs(False),
                                       bb.exits))


def _z(eng, n, seed=0):
  return np.random.default_rng(seed).normal(size=(n, eng.config.model.z_dim)).astype(np.float32)


def _spread(eng, z):
  """(threshold, offset) that send some rows to exit 1, others further."""
  pred = np.asarray(eng.predict(eng.params, jnp.asarray(z)))
  p0 = np.sort(pred[:, 0])
  return 0.5, 0.5 - float(p0[len(p0) // 2 - 1] + p0[len(p0) // 2]) / 2, pred


def test_rows_equal_their_route_and_rule(eng):
  z = _z(eng, 10)   # 10 rows on 4 devices: padded to 12 for the choice, then dropped
  t, off, pred = _spread(eng, z)
  images, exits, got_pred = eng.routed_batch((z,), t, off, with_pred=True)
  assert images.shape == (10, 32, 32, 3) and exits.shape == (10,)
  np.testing.assert_array_equal(exits, np.asarray(routing.choose_exit(pred, t, eng.costs, off)))
  np.testing.assert_allclose(got_pred, pred, atol=1e-5)
  assert len(set(exits.tolist())) >= 2, exits
  images = np.asarray(images)
  for i, r in enumerate(exits):   # the route from the raw input (pipeline.route_fns), one row
    want = np.asarray(eng.routes[r](eng.params, jnp.asarray(z[i:i + 1])))[0]
    np.testing.assert_allclose(images[i], want, atol=1e-4)
  assert float(np.abs(images[exits == exits[0]][0] - images[exits != exits[0]][0]).max()) > 1e-3


def test_routes_continue_from_the_prefix(eng):
  """Block 1 (in the prefix) runs in `choose` only: a route program holds the convolutions
  of its own blocks and branch, not block 1's (each toy block and branch layer is one 3x3
  conv; the head and the branch outputs one more)."""
  x, _ = eng.put((_z(eng, 4),))
  c32 = jnp.asarray(eng.costs, jnp.float32)
  args = (eng.batch_params, x, jnp.float32(0.5), c32, jnp.float32(0.0))
  assert eng.choose.jit.lower(*args).as_text().count('convolution(') == 1   # block 1
  _, _, pre, g = eng.choose(*args)
  assert pre.at == 1
  rows = np.array([0, 2, 3, 1], np.int32)
  specs = dict(eng.pipeline.branches.specs)
  nb = eng.pipeline.backbone.num_blocks
  want = [len(specs[k].spec) + 1 + (k - 1) for k in eng.exits] + [nb - 1 + 1]
  for r, fn in enumerate(eng.from_prefix):
    text = fn.jit.lower(eng.batch_params, pre, g, rows).as_text()
    assert text.count('convolution(') == want[r], (r, text.count('convolution('), want)


def test_sharded_over_local_devices(eng):
  n = jax.local_device_count()
  assert n > 1 and eng.num_devices == n   # conftest: 4 fake CPU devices
  x, batch = eng.put((_z(eng, 6),))
  assert batch == 6 and x[0].shape[0] % n == 0
  assert len(x[0].sharding.device_set) == n
  exits_d, pred_d, pre, _ = eng.choose(eng.batch_params, x, jnp.float32(0.5),
                                       jnp.asarray(eng.costs, jnp.float32), jnp.float32(0.0))
  assert len(pre.x.sharding.device_set) == n and len(pred_d.sharding.device_set) == n


def _compiled_names(caplog, fn):
  """Names of the jitted functions XLA compiled while fn() ran (jax_log_compiles)."""
  caplog.clear()
  jax.config.update('jax_log_compiles', True)
  try:
    with caplog.at_level(logging.WARNING):
      fn()
  finally:
    jax.config.update('jax_log_compiles', False)
  return {m.split('compilation of jit(')[1].split(')')[0] for m in caplog.messages
          if 'XLA compilation of jit(' in m}


def test_warm_compiles_ahead_of_time(eng, caplog):
  """After `warm`, routing a batch of the warmed size and one input compiles none of the
  engine's routed programs (the executables `.lower().compile()` made are used); without it,
  the same calls compile them."""
  z = _z(eng, 8, seed=1)
  t, off, _ = _spread(eng, z)
  c32 = jnp.asarray(eng.costs, jnp.float32)

  def route():
    images, exits = e2.routed_batch((z,), t, off, bucket_sizes=(1, 4))
    image, aux = e2.routed_one(e2.params, (jnp.asarray(z[:1]),), jnp.float32(t), c32,
                               jnp.float32(off))
    out.append((np.asarray(images), exits, np.asarray(image), int(aux['exit'])))

  ours = {'choose', 'from_prefix', 'routed_one'}
  out = []
  e2 = engine_lib.Engine(eng.pipeline)
  assert ours <= _compiled_names(caplog, route)        # cold: compiled at the first call
  e2 = engine_lib.Engine(eng.pipeline)
  assert e2.warm(batch=8, bucket_sizes=(1, 4)) > 0
  assert len(e2.choose.compiled) == 1 and all(len(f.compiled) == 2 for f in e2.from_prefix)
  assert not ours & _compiled_names(caplog, route)     # warm: nothing of ours compiled
  (cold_img, cold_exits, _, _), (images, exits, image, ex) = out
  np.testing.assert_array_equal(exits, cold_exits)
  np.testing.assert_allclose(images, cold_img, atol=1e-5)
  np.testing.assert_allclose(image[0], images[0], atol=1e-4)
  assert ex == int(exits[0])


def test_budget_mode_within_budget(eng):
  z = _z(eng, 12, seed=2)
  pred = np.asarray(eng.predict(eng.params, jnp.asarray(z)))
  costs = eng.costs
  for budget in (costs[0], (costs[0] + costs[-1]) / 2, costs[-1]):
    images, exits = eng.routed_batch((z,), budget=budget)
    assert costs[exits].mean() <= budget + 1e-9
    np.testing.assert_array_equal(exits, routing.budget_exits(pred, costs, budget))
    for i in (0, 11):
      want = np.asarray(eng.routes[exits[i]](eng.params, jnp.asarray(z[i:i + 1])))[0]
      np.testing.assert_allclose(np.asarray(images[i]), want, atol=1e-4)
  # a larger budget never lowers the mean predicted quality it buys
  lo = routing.chosen_lpips(pred, routing.budget_exits(pred, costs, costs[0])).mean()
  hi = routing.chosen_lpips(pred, routing.budget_exits(pred, costs, costs[-1])).mean()
  assert hi <= lo
  with pytest.raises(ValueError, match='mean_budget'):
    eng.routed_batch((z,), budget=costs[0] / 2)

"""core/pipeline.py on a backbone it has never seen (tests/toy_backbone.py): the shared prefix
once, routes continuing from it, every route equal to its composition by hand, costs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax import registry
from fiancee_jax.core import pipeline as pl
from fiancee_jax.metrics import flops
from tests import toy_backbone as toy

registry.register(toy.Toy)


def _pipeline():
  c = toy.base_config()
  bb = registry.get(c)
  gen, br = bb.generator(), bb.branches()
  z = jnp.asarray(np.random.default_rng(0).normal(size=(3, c.model.z_dim)), jnp.float32)
  params = {'generator': gen.init(jax.random.key(0), z),
            'branches': pl.init_branches(bb, br, jax.random.key(1)),
            'predictor': None, 'bank': None}
  return pl.Pipeline(bb, gen, br, None, params, bb.route_costs(False), bb.exits), params, z


def test_routes_continue_from_the_prefix_and_match_by_hand():
  p, params, z = _pipeline()
  gen, gv = p.generator, params['generator']
  img = gen.apply(gv, z)
  x, taps = gen.apply(gv, gen.apply(gv, z, method='start'), 0, p.backbone.num_blocks,
                      method='run_blocks')
  out = jax.jit(lambda pr, zz: [v for k, v in sorted(pl.all_images(p, pr, zz).items(),
                                                      key=lambda kv: str(kv[0]))])(params, z)
  got = dict(zip(sorted(list(p.exits) + ['backbone', 'pred_in'], key=str), out))
  np.testing.assert_allclose(got['backbone'], img, atol=1e-5)
  np.testing.assert_allclose(got['pred_in'], taps['block1'], atol=1e-5)
  fns = pl.route_fns(p)
  assert len(fns) == len(p.exits) + 1
  for r, k in enumerate(p.exits):
    by_hand = p.branches.apply(params['branches'], k, taps[f'block{k}'], method='exit')
    np.testing.assert_allclose(got[k], by_hand, atol=1e-5)
    np.testing.assert_allclose(jax.jit(fns[r])(params, z), by_hand, atol=1e-5)
    np.testing.assert_allclose(pl.exit_image(p, params, k, z), by_hand, atol=1e-5)
  np.testing.assert_allclose(jax.jit(fns[-1])(params, z), img, atol=1e-5)
  assert float(jnp.abs(got[1] - got[2]).max()) > 0   # the exits are not one constant
  # a route never re-runs the prefix: block 1 is applied once in every route's program
  text = jax.jit(fns[1]).lower(params, z).as_text()
  assert text.count('convolution') == 1 + 1 + len(p.branches.specs[1][1].spec) + 1


def test_unguided_backbone_has_no_bank_and_costs_increase():
  p, params, z = _pipeline()
  assert not p.use_bank and pl.guide(p, params, pl.prefix(p, params, z)) is None
  assert np.all(np.diff(p.costs) > 0), p.costs
  rows = flops.measure(p.backbone)
  assert [r['route'] for r in rows] == ['backbone', 'exit1', 'exit2']
  np.testing.assert_allclose([r['gmacs'] for r in rows[1:]], p.costs[:-1], atol=1e-3)
  with pytest.raises(pl.PipelineError, match='exit 3'):
    pl.exit_image(p, params, 3, z)
  with pytest.raises(pl.PipelineError, match='predictor'):
    pl.predict(p, params, pl.prefix(p, params, z))

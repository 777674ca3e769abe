"""The OASIS adapter through the core pipeline: bank feature layout, exit routes composed by
hand, GMACs vs Table 1."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax import config as cfg
from fiancee_jax import registry
from fiancee_jax.backbones.oasis import bank_inputs
from fiancee_jax.backbones.oasis import model as oasis
from fiancee_jax.core import bank as bank_lib
from fiancee_jax.core import pipeline as pl
from fiancee_jax.metrics import macs
from tests.conftest import tiny_config


def _random_pipeline(use_bank=True, seed=0):
  c = tiny_config()
  c.branches.use_bank = use_bank
  c.branches.exits = (1, 2)   # one exit inside the prefix, one continuing after it
  bb = registry.get(c)
  gen, br = bb.generator(), bb.branches(use_bank=use_bank)
  d = c.data
  seg = jax.nn.one_hot(jnp.zeros((1, d.height, d.width), jnp.int32), d.num_classes)
  z = jnp.zeros((1, c.model.z_dim))
  g_vars = jax.jit(gen.init)({'params': jax.random.PRNGKey(seed)}, seg, z)
  b_vars = jax.jit(functools.partial(pl.init_branches, bb, br))(jax.random.PRNGKey(seed + 1))
  bank = None
  if use_bank:
    rng = np.random.default_rng(seed)
    s = bb.bank_shapes()
    n = 40
    bank = bank_lib.make_bank(rng.normal(size=(n, s['key_dim'])).astype(np.float32),
                              rng.normal(size=(n, *s['value_shape'])).astype(np.float32),
                              rng.integers(0, d.num_classes, n), d.num_classes)
  params = {'generator': g_vars, 'branches': b_vars, 'predictor': None, 'bank': bank}
  p = pl.Pipeline(bb, gen, br, None, params, np.zeros(len(bb.exits) + 1), bb.exits)
  return p, params


def _inputs(c, b=2, seed=0):
  rng = np.random.default_rng(seed)
  d = c.data
  labels = rng.integers(0, d.num_classes, (b, d.height // 16, d.width // 16))
  labels = np.repeat(np.repeat(labels, 16, 1), 16, 2)  # blocky maps: clear majorities
  labels[:, ::3, ::5] = 7                              # + noise pixels
  z = rng.normal(size=(b, c.model.z_dim)).astype(np.float32)
  return labels.astype(np.int32), jax.nn.one_hot(labels, d.num_classes), jnp.asarray(z)


def test_bank_features_layout():
  p, params = _random_pipeline(use_bank=False)
  c = p.config
  labels, seg, z = _inputs(c)
  keys, values, classes = jax.jit(functools.partial(bank_inputs.bank_features, p.generator))(
      params['generator'], seg, z)
  h, w = c.data.height // 32, c.data.width // 32
  widths = oasis.widths(c.model.ch)
  assert keys.shape == (2, h, w, widths[1])
  assert values.shape == (2, c.data.height // 8, c.data.width // 8, widths[3])
  # majority label of each 32x32 cell, by hand
  for bi in range(2):
    for i in range(h):
      for j in range(w):
        cell = labels[bi, 32 * i:32 * i + 32, 32 * j:32 * j + 32]
        counts = np.bincount(cell.ravel(), minlength=c.data.num_classes)
        assert classes[bi, i, j] == np.argmax(counts)
  # keys are the block-1 map, values the block-3 map of the full generator
  _, feats = jax.jit(p.generator.apply)(params['generator'], seg, z)
  np.testing.assert_allclose(keys, feats['block1'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(values, feats['block3'], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('use_bank', [True, False])
def test_exit_image_is_prefix_guide_branch(use_bank):
  p, params = _random_pipeline(use_bank=use_bank)
  _, seg, z = _inputs(p.config)
  backbone, feats = jax.jit(p.generator.apply)(params['generator'], seg, z)
  guide = None
  if use_bank:
    q = feats['block1']
    cls = bank_lib.grid_classes(seg, q.shape[1:3])
    idx = bank_lib.nearest(params['bank'], q, cls, backend='faiss')
    guide = bank_lib.glue(params['bank'].values, idx)
  names = list(p.exits) + ['backbone']  # (a dict with int and str keys is no jit output)
  stacked = jax.jit(lambda pr, s, zz: [pl.all_images(p, pr, s, zz)[k] for k in names])(
      params, seg, z)
  all_imgs = dict(zip(names, stacked))
  np.testing.assert_allclose(all_imgs['backbone'], backbone, atol=1e-5)
  cond = jax.jit(functools.partial(p.generator.apply, method='make_cond'))(
      params['generator'], seg, z)
  branch = jax.jit(lambda v, k, x, g: p.branches.apply(v, k, x, cond, g, False, method='exit'),
                   static_argnums=1)
  route = jax.jit(lambda pr, k, s, zz: pl.exit_image(p, pr, k, s, zz), static_argnums=1)
  for k in p.exits:
    by_hand = branch(params['branches'], k, feats[f'block{k}'], guide)
    got = route(params, k, seg, z)
    np.testing.assert_allclose(got, by_hand, atol=1e-5)
    np.testing.assert_allclose(all_imgs[k], by_hand, atol=1e-5)
  fns = pl.route_fns(p)
  assert len(fns) == len(p.exits) + 1
  np.testing.assert_allclose(jax.jit(fns[0])(params, seg, z), all_imgs[p.exits[0]], atol=1e-5)
  # exits differ from each other (the by-hand check is not comparing a constant)
  assert float(jnp.abs(all_imgs[1] - all_imgs[2]).max()) > 0


def test_unguided_exit_ignores_bank_and_guided_needs_it():
  p, params = _random_pipeline(use_bank=True)
  _, seg, z = _inputs(p.config)
  with pytest.raises(pl.PipelineError, match='bank'):
    pl.exit_image(p, {**params, 'bank': None}, 1, seg, z)
  with pytest.raises(pl.PipelineError, match='exit 5'):
    pl.exit_image(p, params, 5, seg, z)


# Table 1 (GFLOPs = GMACs) of the routes through exits 1..4, no bank.
TABLE_1 = {1 / 2: (157, 171, 193, 227), 1 / 3: (137, 154, 182, 227), 1 / 4: (120, 138, 168, 227)}
# Table S8: total branch parameters (M) without / with the bank.
TABLE_S8 = {1 / 2: (45.4, 55.7), 1 / 3: (35.6, 44.5), 1 / 4: (30.9, 39.1)}


def _routes(c, use_bank):
  """GMACs and params of the exit routes at config.branches.sf (bank off / on), then the
  backbone, as the flops CLI counts them."""
  bb = registry.get(c)
  rows = []
  for r in bb.exit_routes(c.branches.sf, use_bank) + [bb.backbone_route()]:
    rows.append({'gmacs': round(macs.count_macs(r.fn, *r.args) / 1e9, 3), **r.extra})
  return rows


@pytest.mark.parametrize('sf', sorted(TABLE_1))
def test_exit_gmacs_match_table1_without_bank(repo, sf):
  c = cfg.load(str(repo / 'configs' / 'oasis_cityscapes.py'))
  c.branches.sf = sf
  rows = _routes(c, use_bank=False)
  got = [r['gmacs'] for r in rows[:4]]
  for g, want in zip(got, TABLE_1[sf]):
    assert abs(g - want) / want < 0.03, (sf, got)
  assert abs(rows[-1]['gmacs'] - 318.6) < 0.5  # backbone, Table 1 "319"
  # Table S8 (without bank): within 5% (ours 44.2 / 34.4 / 29.7 M)
  total = sum(r['branch_params'] for r in rows[:4]) / 1e6
  assert abs(total - TABLE_S8[sf][0]) / TABLE_S8[sf][0] < 0.05, total
  # the router's costs are the same counts (+ the retrieval bound when guided)
  costs = registry.get(c).route_costs(use_bank=False)
  np.testing.assert_allclose(costs, [r['gmacs'] for r in rows], atol=1e-9)


def test_guided_routes_cost_more(repo):
  c = cfg.load(str(repo / 'configs' / 'oasis_cityscapes.py'))
  plain = _routes(c, use_bank=False)
  guided = _routes(c, use_bank=True)
  for a, b in zip(plain[:4], guided[:4]):
    assert b['gmacs'] > a['gmacs'] and b['branch_params'] > a['branch_params']
    assert b['retrieval_gmacs'] == pytest.approx(128 * 5000 * 1024 / 1e9, abs=1e-3)
  # Table S8 with bank: our guide conv (3x3, 512 -> fin/2 at block-3 resolution) makes the
  # set larger than the paper's (44.9M vs 39.1M at SF 1/4); bounded here, reported as a gap.
  total = sum(r['branch_params'] for r in guided[:4]) / 1e6
  assert TABLE_S8[0.25][1] < total < 1.2 * TABLE_S8[0.25][1]

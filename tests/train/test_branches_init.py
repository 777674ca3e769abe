"""Branch-stage options: branches sliced from the backbone (branches.init='backbone'), the
distillation warm-up (branches.warmup_steps), the power iteration behind both, and channel
slicing itself."""
import flax
import jax
import numpy as np
import pytest

from fiancee_jax import registry
from fiancee_jax.core import stages
from fiancee_jax.core.branches import copy_overlap
from fiancee_jax.nn.layers import SN_COLLECTION, sn_power_iterate
from fiancee_jax.train import branches as tb
from tests.conftest import backbone_workdir


def test_copy_overlap_slices_leading_channels_and_fills_the_rest():
  src = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
  out = copy_overlap(np.ones((2, 3, 6, 2), np.float32), src, fill=-1.0)
  np.testing.assert_array_equal(out[:, :, :4, :], src[:, :, :, :2])
  assert np.all(out[:, :, 4:, :] == -1.0)
  with pytest.raises(ValueError, match='rank'):
    copy_overlap(np.ones((2, 3)), src)


def test_sn_power_iterate_finds_the_largest_singular_value():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(3, 3, 8, 6)).astype(np.float32)
  params = {'conv': {'kernel': kernel}, 'other': {'kernel': kernel}}
  stale = {'u': np.ones(6, np.float32), 'v': np.ones(72, np.float32)}
  colls = {SN_COLLECTION: {'conv': dict(stale), 'other': dict(stale)}}
  out = sn_power_iterate(params, colls, iters=200, only={('conv',)})[SN_COLLECTION]
  w = kernel.reshape(-1, 6).T
  sigma = np.linalg.svd(w, compute_uv=False)[0]
  u, v = out['conv']['u'], out['conv']['v']
  np.testing.assert_allclose(float(u @ w @ v), sigma, rtol=1e-4)
  np.testing.assert_array_equal(out['other']['u'], stale['u'])   # not in `only`


def _gen_vars(bb, wd):
  """The backbone's variables with converged spectral-norm vectors (a 2-step backbone's are
  not), so a full-width copy must reproduce it to float tolerance."""
  gen_vars, _ = stages.load_backbone(bb, wd)
  gen_vars = jax.device_get(gen_vars)
  # A 2-step xavier(0.02) backbone draws images of std ~1e-5: a larger output layer (copied
  # by the branches too) makes the images' differences measurable.
  gen_vars['params']['conv_img']['kernel'] = gen_vars['params']['conv_img']['kernel'] * 1e4
  return {**gen_vars, **sn_power_iterate(gen_vars['params'],
                                         {k: v for k, v in gen_vars.items() if k != 'params'})}


def test_backbone_init_at_full_width_reproduces_the_backbone(tmp_path_factory):
  """sf = 1: every branch is a copy of the blocks it mirrors, so each exit's image is the
  backbone's image; random init is nowhere near."""
  c, wd, _ = backbone_workdir(tmp_path_factory)
  c = c.copy_and_resolve_references()
  c.branches.sf, c.branches.use_bank = 1.0, False
  c.branches.exits = (1, 3)   # one with the identity shortcut, one with conv_s (fewer compiles)
  bb = registry.get(c)
  models = tb.build_models(bb)
  disc = tb.disc_template(bb)
  gen = _gen_vars(bb, wd)
  rng = np.random.default_rng(1)
  labels = rng.integers(0, c.data.num_classes, (2, c.data.height, c.data.width))
  z = rng.normal(size=(2, c.model.z_dim)).astype(np.float32)
  images = tb.images_fn(bb, use_bank=False)
  out = {}
  for init in ('backbone', 'random'):
    c.branches.init = init
    host = tb.create_train_state(bb, models, disc, generator=gen)
    params = {'generator': gen, 'bank': None,
              'branches': {'params': host.params_b, **host.state_b}}
    out[init] = images(params, labels, z)
  ref = out['backbone']['backbone']
  assert np.std(ref) > 0.05
  for k in c.branches.exits:
    np.testing.assert_allclose(out['backbone'][k], ref, atol=1e-3, err_msg=f'exit {k}')
    assert np.mean(np.abs(out['random'][k] - ref)) > 0.05


def test_backbone_init_sliced_with_the_guide(tmp_path_factory):
  """At the config's widths with the bank: every kernel is the backbone's leading block, the
  guide-input channels start at zero, and the sliced kernels' SN vectors are recomputed."""
  c, wd, _ = backbone_workdir(tmp_path_factory)
  c = c.copy_and_resolve_references()
  c.branches.init = 'backbone'
  bb = registry.get(c)
  models = tb.build_models(bb)
  gen = _gen_vars(bb, wd)
  host = tb.create_train_state(bb, models, tb.disc_template(bb), generator=gen)
  k = c.branches.exits[1]
  br = host.params_b[f'branches_branch_{k}']['body_0']
  src = gen['params'][f'body_{k}']
  fin = src['conv_0']['kernel'].shape[2]
  kern = np.asarray(br['conv_0']['kernel'])
  assert kern.shape[2] > fin                                   # guide channels appended
  np.testing.assert_array_equal(kern[:, :, :fin], src['conv_0']['kernel'][:, :, :, :kern.shape[3]])
  assert np.all(kern[:, :, fin:] == 0)
  sn = host.state_b[SN_COLLECTION][f'branches_branch_{k}']['body_0']['conv_0']
  w = kern.reshape(-1, kern.shape[-1]).T
  np.testing.assert_allclose(float(sn['u'] @ w @ sn['v']),
                             np.linalg.svd(w, compute_uv=False)[0], rtol=1e-2)


def test_warmup_step_trains_branches_only(tmp_path_factory):
  """adversarial=False: the branches move on the distillation loss, the discriminator copies
  and their optimiser state do not."""
  c, wd, _ = backbone_workdir(tmp_path_factory)
  c = c.copy_and_resolve_references()
  c.branches.exits, c.branches.use_bank, c.branches.alpha_vgg = (1, 3), False, 0.0
  bb = registry.get(c)
  models = tb.build_models(bb, axis_name=None)
  frozen, _ = tb.load_frozen(bb, wd, models)
  host = tb.create_train_state(bb, models, tb.disc_template(bb))
  b, h, w = c.branches.batch_size, c.data.height, c.data.width
  rng = np.random.default_rng(2)
  batch = {'image': rng.integers(0, 256, (b, h, w, 3)).astype(np.uint8),
           'label': rng.integers(0, c.data.num_classes, (b, h, w)).astype(np.int32)}
  step = jax.jit(tb.make_step(models, adversarial=False), static_argnames='axis_name')
  new, m = step(tb.BranchState(train=host, frozen=frozen), batch, axis_name=None)
  new = jax.device_get(new.train)
  assert int(new.step) == 1
  assert np.isfinite(float(m['b_total'])) and float(m['exit1/l1']) > 0
  assert 'exit1/d_fake' not in m
  same = lambda a, b: all(np.array_equal(x, y) for x, y in  # noqa: E731
                          zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert same(new.params_d, host.params_d) and same(new.opt_d, host.opt_d)
  assert not same(new.params_b, host.params_b)
  assert flax.traverse_util.flatten_dict(new.params_b).keys() == \
      flax.traverse_util.flatten_dict(host.params_b).keys()

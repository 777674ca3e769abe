"""Branch specs from each adapter's block list (Tables S8 / S9 rule, core/branches.py) and the
branch blocks built through the one container."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax import config as cfg
from fiancee_jax import registry
from fiancee_jax.config import ConfigError
from fiancee_jax.core.branches import branch_spec
from tests.conftest import tiny_config

# Table S8: (fin, fout, h, w) of every SPADE-ResBlock per branch, min channels 64.
TABLE_S8 = {
    1 / 2: {1: [(1024, 512, 16, 32), (512, 256, 32, 64), (256, 128, 64, 128), (128, 64, 128, 256),
                (64, 64, 256, 512)],
            2: [(1024, 256, 32, 64), (256, 128, 64, 128), (128, 64, 128, 256), (64, 64, 256, 512)],
            3: [(512, 128, 64, 128), (128, 64, 128, 256), (64, 64, 256, 512)],
            4: [(256, 64, 128, 256), (64, 64, 256, 512)]},
    1 / 3: {1: [(1024, 336, 16, 32), (336, 168, 32, 64), (168, 84, 64, 128), (84, 64, 128, 256),
                (64, 64, 256, 512)],
            2: [(1024, 168, 32, 64), (168, 84, 64, 128), (84, 64, 128, 256), (64, 64, 256, 512)],
            3: [(512, 84, 64, 128), (84, 64, 128, 256), (64, 64, 256, 512)],
            4: [(256, 64, 128, 256), (64, 64, 256, 512)]},
    1 / 4: {1: [(1024, 256, 16, 32), (256, 128, 32, 64), (128, 64, 64, 128), (64, 64, 128, 256),
                (64, 64, 256, 512)],
            2: [(1024, 128, 32, 64), (128, 64, 64, 128), (64, 64, 128, 256), (64, 64, 256, 512)],
            3: [(512, 64, 64, 128), (64, 64, 128, 256), (64, 64, 256, 512)],
            4: [(256, 64, 128, 256), (64, 64, 256, 512)]},
}

# Table S9 (MegaPortraits, min channels 24): (fin, fout) per ResBlock2D per branch, without
# the bank's +3 input channels. Exit 6 (the third branch): Table S9 lists outputs one width
# step earlier (e.g. SF 1/3: 170, 85, 42 then a (24, 3) head, which does not chain). The rule
# used by the first two branches (fout = scaled backbone fout) gives 85, 42, 24 and reproduces
# Table 2's route-3 GMACs at SF 1/3 (136; the printed column would cost ~165) and 1/15, but
# not at 1/6, where the printed column fits (tests/test_megaportraits.py pins both readings).
# We follow the rule.
TABLE_S9 = {
    1 / 3: {2: [(512, 170), (170, 170), (170, 170), (170, 170), (170, 85), (85, 42), (42, 24)],
            4: [(512, 170), (170, 170), (170, 85), (85, 42), (42, 24)],
            6: [(512, 85), (85, 42), (42, 24)]},
    1 / 6: {2: [(512, 85), (85, 85), (85, 85), (85, 85), (85, 42), (42, 24), (24, 24)],
            4: [(512, 85), (85, 85), (85, 42), (42, 24), (24, 24)],
            6: [(512, 42), (42, 24), (24, 24)]},
    1 / 8: {2: [(512, 64), (64, 64), (64, 64), (64, 64), (64, 32), (32, 24), (24, 24)],
            4: [(512, 64), (64, 64), (64, 32), (32, 24), (24, 24)],
            6: [(512, 32), (32, 24), (24, 24)]},
    1 / 15: {2: [(512, 34), (34, 34), (34, 34), (34, 34), (34, 24), (24, 24), (24, 24)],
             4: [(512, 34), (34, 34), (34, 24), (24, 24), (24, 24)],
             6: [(512, 24), (24, 24), (24, 24)]},
}


@pytest.mark.parametrize('sf', sorted(TABLE_S8))
def test_oasis_branch_specs_match_table_s8(repo, sf):
  c = cfg.load(str(repo / 'configs' / 'oasis_cityscapes.py'))
  c.branches.sf = sf
  specs = registry.get(c).branch_specs()
  assert sorted(specs) == [1, 2, 3, 4]
  for k, rows in TABLE_S8[sf].items():
    assert [(b.fin, b.fout, b.height, b.width) for b in specs[k]] == rows, k


@pytest.mark.parametrize('sf', sorted(TABLE_S9))
def test_megaportraits_branch_specs_match_table_s9(repo, sf):
  c = cfg.load(str(repo / 'configs' / 'megaportraits_voxceleb2.py'))
  c.branches.sf = sf
  specs = registry.get(c).branch_specs()
  for k, rows in TABLE_S9[sf].items():
    assert [(b.fin, b.fout) for b in specs[k]] == rows, k
    assert specs[k][-1].height == 512  # every branch ends at the output resolution


def test_branch_after_last_block_is_rejected(repo):
  c = cfg.load(str(repo / 'configs' / 'oasis_cityscapes.py'))
  with pytest.raises(ValueError, match='exit after block 6'):
    branch_spec(registry.get(c).blocks(), 6, 0.25, 64, 64)


@pytest.mark.parametrize('use_bank', [True, False])
def test_oasis_branches_forward_tiny(use_bank):
  c = tiny_config()
  model = registry.get(c).branches(use_bank=use_bank)
  h0, w0 = c.data.height // 32, c.data.width // 32
  w = cfg.oasis_widths(c.model.ch)
  feats = {f'block{k}': jnp.ones((2, h0 * 2 ** (k - 1), w0 * 2 ** (k - 1), w[k]))
           for k in c.branches.exits}
  cond = jnp.ones((2, c.data.height, c.data.width, c.model.z_dim + c.data.num_classes))
  guide = jnp.ones((2, h0 * 4, w0 * 4, w[3])) if use_bank else None
  variables = model.init(jax.random.key(0), feats, cond, guide)
  out = model.apply(variables, feats, cond, guide)
  assert sorted(out) == list(c.branches.exits)
  for img in out.values():
    assert img.shape == (2, c.data.height, c.data.width, 3)
    assert float(jnp.abs(img).max()) <= 1.0
  if use_bank:
    # Table S8 caption: the first block's input is fin x 1.5 with the bank.
    p = variables['params']['branches_branch_1']['body_0']['norm_0']['mlp_gamma']['kernel']
    assert p.shape[-1] == w[1] * 3 // 2
    with pytest.raises(ValueError, match='guide'):
      model.apply(variables, feats, cond, None)


def _g2d_abstract(config, sf: float, use_bank: bool, batch: int = 1):
  """(the G2D Branches, abstract feats of the exit blocks, abstract frame or None)."""
  bb = registry.get(config)
  model = bb.branches(use_bank=use_bank, sf=sf)
  blocks = bb.blocks()
  feats = {f'block{k}': jax.ShapeDtypeStruct(
      (batch, blocks[k - 1].height, blocks[k - 1].width, blocks[k - 1].fout), jnp.float32)
      for k in config.branches.exits}
  h = config.data.height
  frame = jax.ShapeDtypeStruct((batch, h, h, 3), jnp.float32) if use_bank else None
  return model, feats, frame


@pytest.mark.parametrize('use_bank', [False, True])
@pytest.mark.parametrize('sf', sorted(TABLE_S9))
def test_g2d_branch_modules_match_table_s9(repo, sf, use_bank):
  """Built modules (shapes only) at the paper config: every ResBlock2D's kernels are
  (Table S9 fin [+3 with the bank], fout), the head is Table S9's (24, 3)."""
  c = cfg.load(str(repo / 'configs' / 'megaportraits_voxceleb2.py'))
  model, feats, frame = _g2d_abstract(c, sf, use_bank)
  params = jax.eval_shape(lambda f, g: model.init(jax.random.key(0), f, None, g), feats, frame)['params']
  assert sorted(params) == [f'branches_branch_{k}' for k in (2, 4, 6)]
  extra = 3 if use_bank else 0
  for k, rows in TABLE_S9[sf].items():
    p = params[f'branches_branch_{k}']
    assert sorted(n for n in p if n.startswith('block_')) == [f'block_{i}' for i in range(len(rows))]
    for i, (fin, fout) in enumerate(rows):
      blk = p[f'block_{i}']
      assert blk['conv_0']['kernel'].shape == (3, 3, fin + extra, fout), (k, i)
      assert blk['conv_1']['kernel'].shape == (3, 3, fout, fout), (k, i)
      assert ('conv_s' in blk) == (fin + extra != fout), (k, i)
    assert p['out_conv']['kernel'].shape == (3, 3, 24, 3)   # Table S9: ReLU, Conv2D, Tanh (24, 3)


@pytest.mark.parametrize('use_bank', [True, False])
def test_g2d_branches_forward_tiny(repo, use_bank):
  c = cfg.load(str(repo / 'configs' / 'megaportraits_synthetic.py'), 'tiny')
  model, feats_abs, frame_abs = _g2d_abstract(c, c.branches.sf, use_bank, batch=2)
  keys = jax.random.split(jax.random.key(0), len(feats_abs) + 2)
  feats = {n: jax.random.normal(kk, a.shape) for kk, (n, a) in zip(keys, feats_abs.items())}
  h = c.data.height
  frame = jax.random.uniform(keys[-1], (2, h, h, 3), minval=-1, maxval=1) if use_bank else None

  def run(key, feats, frame):
    v = model.init(key, feats, None, frame)
    out = model.apply(v, feats, None, frame)
    other = model.apply(v, feats, None, None if frame is None else -frame)
    _, new = model.apply(v, feats, None, frame, True, mutable=['batch_stats'])
    return v, out, other, new
  # One compile with XLA optimisations off (several times faster than eager init on CPU).
  variables, out, other, new = jax.jit(run).lower(keys[-2], feats, frame).compile(
      {'xla_backend_optimization_level': 0})(keys[-2], feats, frame)
  assert sorted(out) == [2, 4, 6]
  for img in out.values():
    assert img.shape == (2, h, h, 3) and img.dtype == jnp.float32
    assert float(jnp.abs(img).max()) <= 1.0 and float(jnp.std(img)) > 0
  # Train mode updates the BN statistics of the branch blocks.
  stat = lambda t: t['batch_stats']['branches_branch_6']['block_0']['norm_0']['mean']
  assert not np.allclose(stat(new), stat(variables))
  if use_bank:
    # The frame enters every block (+3 channels): changing it changes every exit.
    for k in out:
      assert float(jnp.mean(jnp.abs(other[k] - out[k]))) > 0, k
    with pytest.raises(ValueError, match='bank frame'):
      model.apply(variables, feats, None, None)


def test_unknown_backbone_is_refused():
  c = tiny_config()
  c.backbone = 'stylegan'
  with pytest.raises(ConfigError, match="config.backbone='stylegan': expected one of"):
    registry.get(c)

"""GMAC / parameter counter: paper numbers from shapes, and agreement with XLA's cost analysis."""
import json
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from fiancee_jax import config as cfg
from fiancee_jax.config import ConfigError
from fiancee_jax import registry
from fiancee_jax.metrics import flops, macs
from fiancee_jax.nn import layers


def test_oasis_cityscapes_paper_counts(repo):
  # Table 1 / DESIGN: OASIS Cityscapes generator, 71.11M params, 318.6 GMACs at 256x512.
  (row,) = [r for r in flops.measure(registry.get(cfg.load(str(repo / 'configs/oasis_cityscapes.py'))))
            if r['route'] == 'backbone']
  assert row['resolution'] == [256, 512]
  assert abs(row['params'] / 1e6 - 71.11) <= 0.01, row
  assert abs(row['gmacs'] - 318.6) <= 0.2, row


class _ConvNet(nn.Module):
  """Convs of every flavour (padding, stride, groups, dilation, transpose) and a dense."""

  @nn.compact
  def __call__(self, x):
    x = layers.SNConv(8, 3, use_bias=False, spectral_norm=False)(x)
    x = nn.Conv(8, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False)(x)
    x = nn.Conv(16, (5, 5), padding='SAME', feature_group_count=2, use_bias=False)(x)
    x = nn.Conv(4, (3, 3), kernel_dilation=2, padding='SAME', use_bias=False)(x)
    x = nn.ConvTranspose(4, (4, 4), strides=(2, 2), padding='SAME', use_bias=False)(x)
    return nn.Dense(10, use_bias=False)(x.reshape(x.shape[0], -1))


def test_count_matches_xla_cost_analysis():
  x = jnp.ones((2, 16, 12, 3))
  net = _ConvNet()
  v = net.init(jax.random.key(0), x)
  f = lambda v, x: net.apply(v, x)
  ca = jax.jit(f).lower(v, x).compile().cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  macs_real = macs.count_macs(f, v, x, count_padded=False)
  assert abs(2 * macs_real - ca['flops']) <= 0.01 * ca['flops']
  # Padded taps are counted by default: strictly more here (3x3 'SAME' borders).
  assert macs.count_macs(f, v, x) > macs_real


def test_count_by_hand_and_abstract_args():
  # 3x3 conv 3->8 on 10x10 with padding 1: padded count 100*8*9*3; real taps per dim:
  # 10 outputs x 3 taps - 2 border taps = 28 -> 28*28*8*3.
  conv = layers.SNConv(8, 3, spectral_norm=False)
  x = jax.ShapeDtypeStruct((1, 10, 10, 3), jnp.float32)
  v = jax.eval_shape(lambda x: conv.init(jax.random.key(0), x), x)
  f = lambda v, x: conv.apply(v, x)
  assert macs.count_macs(f, v, x) == 100 * 8 * 9 * 3
  assert macs.count_macs(f, v, x, count_padded=False) == 28 * 28 * 8 * 3
  assert macs.count_params(v['params']) == 3 * 3 * 3 * 8 + 8
  # Recursion into sub-jaxprs: jit, remat and scan (x length).
  g = jax.checkpoint(jax.jit(f))
  assert macs.count_macs(g, v, x) == 100 * 8 * 9 * 3

  def scanned(v, x):
    return jax.lax.scan(lambda c, _: (c, f(v, x)), 0.0, None, length=4)[1]
  assert macs.count_macs(scanned, v, x) == 4 * 100 * 8 * 9 * 3


def test_unknown_backbone_is_a_clear_error():
  c = cfg.base_oasis().copy_and_resolve_references()
  with c.unlocked():
    c.backbone = 'nope'
  with pytest.raises(ConfigError, match="config.backbone='nope': expected one of"):
    flops.measure(registry.get(c))


def test_cli_json(repo, capsys):
  flops.main(['--config', str(repo / 'configs/oasis_synthetic.py'), '--json'])
  out = capsys.readouterr().out
  rows = [json.loads(l) for l in out.splitlines() if l.startswith('{')]
  assert rows[0]['route'] == 'backbone' and rows[0]['resolution'] == [64, 128]
  # ch 16 at 64x128 is ~(1/4)^2 of the widths and 1/16 of the pixels of the paper config.
  assert 0 < rows[0]['gmacs'] < 318.6 / 16

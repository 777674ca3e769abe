"""A third backbone, used only by the tests, to prove the core is generic: an unconditional
noise-to-image decoder (what the paper's Discussion says StyleGAN would be), without a bank.

z (B, z_dim) -> Dense -> 4x4 map -> `num_blocks` blocks (nearest x2 + conv3x3 + lrelu) ->
conv3x3 + tanh at 4 * 2**num_blocks pixels. Its adapter implements `Backbone` and nothing in
fiancee_jax/ knows it: tests register it with `fiancee_jax.registry.register`.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fiancee_jax import config as cfg
from fiancee_jax.core import pipeline as pl
from fiancee_jax.core.branches import BlockSpec, BranchSpec
from fiancee_jax.core.interface import Backbone, Prefix
from fiancee_jax.metrics import macs

NAME = 'toy'


def base_config() -> ml_collections.ConfigDict:
  """The toy's config: the sections every stage reads (cfg.base_oasis's, less the model)."""
  c = cfg.base_oasis()
  c.backbone = NAME
  c.name = 'toy'
  c.model = ml_collections.ConfigDict({'z_dim': 8, 'ch': 16, 'num_blocks': 4})
  c.data.height = c.data.width = 4 * 2 ** 4
  c.branches.exits = (1, 2)
  c.branches.sf = 0.5
  c.branches.min_channels = 4
  c.branches.use_bank = False
  c.predictor.mlp = (16,)
  return c


def _check(config, need) -> None:
  m, d = config.model, config.data
  need(d.height == d.width == 4 * 2 ** m.num_blocks,
       f'data: expected {4 * 2 ** m.num_blocks}x{4 * 2 ** m.num_blocks} for {m.num_blocks} blocks')
  need(all(1 <= k < m.num_blocks for k in config.branches.exits), 'branches.exits out of range')


cfg.register_base(NAME, base_config, _check)


def _block(ch: int, name: str) -> nn.Module:
  return nn.Conv(ch, (3, 3), padding='SAME', name=name)


class Decoder(nn.Module):
  z_dim: int
  ch: int
  num_blocks: int

  def setup(self):
    self.stem = nn.Dense(4 * 4 * self.ch)
    self.body = [_block(self.ch, f'body_{i}') for i in range(self.num_blocks)]
    self.to_rgb = nn.Conv(3, (3, 3), padding='SAME')

  def start(self, z: jax.Array) -> jax.Array:
    return self.stem(z).reshape(z.shape[0], 4, 4, self.ch)

  def run_blocks(self, x: jax.Array, start: int, stop: int) -> tuple[jax.Array, dict]:
    taps = {}
    for k in range(start + 1, stop + 1):
      x = nn.leaky_relu(self.body[k - 1](jnp.repeat(jnp.repeat(x, 2, 1), 2, 2)), 0.2)
      taps[f'block{k}'] = x
    return x, taps

  def head(self, x: jax.Array) -> jax.Array:
    return jnp.tanh(self.to_rgb(x))

  def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
    return self.head(self.run_blocks(self.start(z), 0, self.num_blocks)[0])


class ToyBranch(nn.Module):
  spec: BranchSpec

  @nn.compact
  def __call__(self, x, ctx=None, guide=None, train=False):
    for i, b in enumerate(self.spec):
      x = nn.leaky_relu(_block(b.fout, f'body_{i}')(jnp.repeat(jnp.repeat(x, 2, 1), 2, 2)), 0.2)
    return jnp.tanh(nn.Conv(3, (3, 3), padding='SAME', name='to_rgb')(x))


class ToyPredictor(nn.Module):
  num_exits: int
  mlp: Sequence[int]

  @nn.compact
  def __call__(self, feat):
    x = feat.reshape(feat.shape[0], -1)
    for i, w in enumerate(self.mlp):
      x = nn.relu(nn.Dense(w, name=f'fc{i}')(x))
    return nn.Dense(self.num_exits, name='out')(x)


class Toy(Backbone):
  name = NAME
  scale_factors = (0.5,)
  has_bank = False

  def blocks(self) -> list[BlockSpec]:
    m = self.config.model
    return [BlockSpec(m.ch, m.ch, 4 * 2 ** k, 4 * 2 ** k, 'nearest')
            for k in range(1, m.num_blocks + 1)]

  def generator(self, axis_name=None) -> Decoder:
    m = self.config.model
    return Decoder(m.z_dim, m.ch, m.num_blocks)

  def discriminator(self):
    raise NotImplementedError('the toy backbone has no discriminator')

  def branch_block(self, spec, use_bank, axis_name=None) -> ToyBranch:
    return ToyBranch(spec)

  def predictor(self) -> ToyPredictor:
    return ToyPredictor(len(self.exits), tuple(self.config.predictor.mlp))

  def abstract_inputs(self, batch: int = 1):
    return (jax.ShapeDtypeStruct((batch, self.config.model.z_dim), jnp.float32),)

  def prefix_stop(self, exits, use_bank) -> int:
    return min(exits)

  def prefix(self, gen_vars, inputs, stop) -> Prefix:
    (z,) = inputs

    def f(mdl, zz):
      return mdl.run_blocks(mdl.start(zz), 0, stop)
    x, taps = self.generator().apply(gen_vars, z, method=f)
    return Prefix(x=x, ctx=None, taps=taps, pred_in=taps['block1'], query=None, at=stop)

  def advance(self, gen_vars, x, ctx, start, stop):
    return self.generator().apply(gen_vars, x, start, stop, method='run_blocks')

  def head(self, gen_vars, x):
    return self.generator().apply(gen_vars, x, method='head')

  def backbone_route(self) -> macs.Route:
    g = self.generator()
    (z,) = self.abstract_inputs()
    v = jax.eval_shape(lambda a: g.init(jax.random.key(0), a), z)
    return macs.Route('backbone', lambda vv, a: g.apply(vv, a), (v, z),
                      macs.count_params(v), (self.config.data.height, self.config.data.width))

  def exit_routes(self, sf: float, use_bank: bool) -> list[macs.Route]:
    c = ml_collections.ConfigDict(self.config.to_dict())
    c.branches.sf = sf
    p, params = pl.abstract(Toy(c), False)
    return [macs.Route(f'exit{k}', fn, (params, *self.abstract_inputs()), 0,
                       (c.data.height, c.data.width), {'sf': sf, 'bank': False, 'exit': k})
            for k, fn in zip(p.exits, pl.route_fns(p)[:-1])]

  def route_costs(self, use_bank: bool) -> np.ndarray:
    rows = [macs.count_macs(r.fn, *r.args) / 1e9
            for r in self.exit_routes(self.config.branches.sf, False) + [self.backbone_route()]]
    return np.asarray(rows, np.float64)

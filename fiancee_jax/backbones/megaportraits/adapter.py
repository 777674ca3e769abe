"""MegaPortraits-style head avatars (cross-reenactment, Sec. 4.2, S1.2) as a FIANCEE backbone.

Route inputs: (source, driver, identity) = images (B, H, W, 3) in [-1, 1] and the source's
identity id (B,) int32 (it picks the frame bank). Prefix: the encoders + fusion + G2D's input
conv (what every route shares); the predictor reads the driver's motion key (3 Euler angles ++
expression, also the bank key); blocks 1..9 are G2D's ResBlock2D. Guide: the bank frame whose
key is nearest to the driver's among the source identity's frames (S1.2.1).
GMACs are counted like Table 2: from G2D's input (the front end, shared by every route, is
reported beside the backbone route).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fiancee_jax.backbones.megaportraits import discriminator as discriminator_lib
from fiancee_jax.backbones.megaportraits.branch_losses import HeadsBranchLosses
from fiancee_jax.backbones.megaportraits import frame_banks
from fiancee_jax.backbones.megaportraits import inputs as inputs_lib
from fiancee_jax.backbones.megaportraits import model as megaportraits
from fiancee_jax.backbones.megaportraits.exits import FRAME_CHANNELS, G2DBranch, MotionPredictor
from fiancee_jax.backbones.megaportraits.gan import HeadsGAN
from fiancee_jax.backbones.megaportraits.predictor_rows import HeadsPredictorRows
from fiancee_jax.core import bank as bank_lib
from fiancee_jax.core.branches import BlockSpec, BranchSpec
from fiancee_jax.core.interface import Backbone, Prefix
from fiancee_jax.metrics import macs
from fiancee_jax.train.parallel import AXIS
from fiancee_jax import workdir as wd

PyTree = Any


class MegaPortraits(Backbone):
  name = 'megaportraits'
  scale_factors = (1 / 3, 1 / 6, 1 / 8, 1 / 15)   # Table S9 (Table 2 lists 1/3, 1/6, 1/15)

  # ---------------------------------------------------------------- structure

  def blocks(self) -> list[BlockSpec]:
    d, m = self.config.data, self.config.model
    base = d.height // 8
    blocks = [BlockSpec(m.ch, m.ch, base, base, None) for _ in range(m.num_res)]
    fin = m.ch
    for i, fout in enumerate(m.up_channels):
      blocks.append(BlockSpec(fin, fout, base * 2 ** (i + 1), base * 2 ** (i + 1), 'bilinear'))
      fin = fout
    return blocks

  # ---------------------------------------------------------------- modules

  def generator(self, axis_name: str | None = None) -> megaportraits.HeadAvatar:
    return megaportraits.from_config(self.config, axis_name=axis_name)

  def init_generator(self, rng: jax.Array, inputs: tuple) -> PyTree:
    source, driver, _ = inputs   # the identity only picks the frame bank
    return self.generator().init({'params': rng}, source, driver, False)

  def discriminator(self):
    return discriminator_lib.from_config(self.config)

  def branch_block(self, spec: BranchSpec, use_bank: bool,
                   axis_name: str | None = None) -> G2DBranch:
    return G2DBranch(spec, use_bank, axis_name, megaportraits.dtype_of(self.config.dtype))

  def predictor(self) -> MotionPredictor:
    return MotionPredictor(num_exits=len(self.config.branches.exits),
                           mlp=tuple(self.config.predictor.mlp))

  # ---------------------------------------------------------------- inputs

  def abstract_inputs(self, batch: int = 1) -> tuple[jax.ShapeDtypeStruct, ...]:
    d = self.config.data
    img = jax.ShapeDtypeStruct((batch, d.height, d.width, 3), jnp.float32)
    return img, img, jax.ShapeDtypeStruct((batch,), jnp.int32)

  # ---------------------------------------------------------------- forward (eval)

  def prefix_stop(self, exits: Sequence[int], use_bank: bool) -> int:
    return 0

  def prefix(self, gen_vars: PyTree, inputs: tuple, stop: int) -> Prefix:
    source, driver, identity = inputs

    def f(mdl, s, d):
      x, front = mdl.encode(s, d, False)
      x = mdl.input_conv(x)
      return mdl.run_blocks(x, 0, stop, False), front['motion']
    x, motion = self.generator().apply(gen_vars, source, driver, method=f)
    taps = {f'block{stop}': x} if stop else {}
    return Prefix(x=x, ctx=None, taps=taps, pred_in=motion,
                  query=(motion, jnp.asarray(identity, jnp.int32)), at=stop)

  def advance(self, gen_vars: PyTree, x: jax.Array, ctx: Any, start: int, stop: int
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    x = self.generator().apply(gen_vars, x, start, stop, False, method='run_blocks')
    return x, {f'block{stop}': x}

  def head(self, gen_vars: PyTree, x: jax.Array) -> jax.Array:
    return self.generator().apply(gen_vars, x, method='head')

  # ---------------------------------------------------------------- bank

  def bank_shapes(self) -> dict[str, Any]:
    d = self.config.data
    return {'grid': [1, 1], 'key_dim': 3 + int(self.config.model.expr_dim),
            'value_shape': [int(d.height), int(d.width), FRAME_CHANNELS], 'num_classes': 1}

  def guide(self, bank: frame_banks.FrameBanks, prefix: Prefix, backend: str) -> jax.Array:
    motion, identity = prefix.query
    return frame_banks.retrieve_frame(bank.bank, bank.slots, motion, identity, backend)

  def guide_shape(self, batch: int = 1) -> jax.ShapeDtypeStruct:
    d = self.config.data
    return jax.ShapeDtypeStruct((batch, d.height, d.width, FRAME_CHANNELS), jnp.float32)

  def abstract_bank(self) -> frame_banks.FrameBanks:
    s = self.bank_shapes()
    n = int(self.config.bank.frames_per_identity)
    sds = jax.ShapeDtypeStruct
    host = bank_lib.BankHost(np.zeros((1, s['key_dim']), np.float32), np.zeros(1, np.int32), 1)
    bank = bank_lib.Bank(keys=sds((n, s['key_dim']), jnp.float32),
                         values=sds((n, 1, 1, *s['value_shape']), jnp.float32),
                         key_classes=sds((n,), jnp.int32), key_sqnorm=sds((n,), jnp.float32),
                         class_counts=sds((1,), jnp.int32), class_offsets=sds((1,), jnp.int32),
                         host=host)
    return frame_banks.FrameBanks(bank, sds((1,), jnp.int32), (0,))

  def retrieval_macs(self) -> int:
    return int(self.config.bank.frames_per_identity * (3 + self.config.model.expr_dim))

  def load_bank(self, workdir: str, backbone_step: int | None, verify: bool = True,
                identities: Sequence[int] | None = None) -> frame_banks.FrameBanks:
    """The stacked frame banks of `identities` (default: every identity of the data)."""
    if identities is None:
      identities = frame_banks.all_identities(self.config, wd.data_dir(self.config, workdir))
    return frame_banks.load_banks(self.config, self.bank_shapes(), workdir, identities,
                                  backbone_step, verify)

  def build_bank(self, workdir: str, gen_vars: PyTree, backbone_step: int | None, *,
                 force: bool, batch_size: int, progress: bool,
                 identities: Sequence[int] | None = None) -> dict[int, dict]:
    return frame_banks.build_bank(self.config, self.bank_shapes(), workdir, gen_vars,
                                  backbone_step, force=force, batch_size=batch_size,
                                  progress=progress, identities=identities)

  # ---------------------------------------------------------------- training stages

  def gan_task(self, axis_name: str | None = AXIS) -> HeadsGAN:
    return HeadsGAN(self.config, axis_name)

  def branch_losses(self) -> HeadsBranchLosses:
    return HeadsBranchLosses(self.config)

  def predictor_rows(self) -> HeadsPredictorRows:
    return HeadsPredictorRows(self.config)

  # ---------------------------------------------------------------- inference

  def infer_inputs(self) -> inputs_lib.HeadInputs:
    return inputs_lib.HeadInputs(self.config)

  # ---------------------------------------------------------------- costs

  def _abstract(self):
    model = self.generator()
    h, w = self.config.data.height, self.config.data.width
    img = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    g2d_in = jax.ShapeDtypeStruct((1, h // 8, w // 8, self.config.model.g2d_in), jnp.float32)
    variables = jax.eval_shape(lambda a, b: model.init(jax.random.key(0), a, b, False), img, img)
    return model, variables, g2d_in, img

  def backbone_route(self) -> macs.Route:
    """G2D from its input (what the paper's 213 GMACs counts, Sec. 4.2: the 9 ResBlock2D
    modules + 1x1 in / conv out); the front end's cost in the route's extras."""
    model, variables, g2d_in, img = self._abstract()
    g2d_vars = {k: {'g2d': v['g2d']} for k, v in variables.items()}

    def backbone(v, x):
      return nn.apply(lambda mdl, z: mdl.g2d(z, False)[0], model)(v, x)

    def front(v, a, b):
      return model.apply(v, a, b, False, method=megaportraits.HeadAvatar.encode)[0]

    n_front = macs.count_params({k: v for k, v in variables['params'].items() if k != 'g2d'})
    front_macs = macs.count_macs(front, variables, img, img)
    return macs.Route('backbone', backbone, (g2d_vars, g2d_in),
                      macs.count_params(variables['params']['g2d']),
                      (self.config.data.height, self.config.data.width),
                      {'counts': 'G2D', 'front_end_gmacs': round(front_macs / 1e9, 3),
                       'front_end_params': n_front})

  def exit_routes(self, sf: float, use_bank: bool) -> list[macs.Route]:
    """Routes through every exit at scale factor `sf`: G2D's input conv + blocks 1..k +
    branch k, counted like the backbone route. With the bank the retrieved frame is an input;
    its search (frames x (3 + expr_dim) key MACs, exact flat search) is in 'retrieval_gmacs'."""
    model, variables, g2d_in, img = self._abstract()
    g2d_vars = {k: {'g2d': v['g2d']} for k, v in variables.items()}
    g2d_p = variables['params']['g2d']
    br = self.branches(use_bank=use_bank, sf=sf)
    blocks = self.blocks()
    frame = img if use_bank else None
    feats = {f'block{k}': jax.ShapeDtypeStruct(
        (1, blocks[k - 1].height, blocks[k - 1].width, blocks[k - 1].fout), jnp.float32)
        for k in br.exits}
    br_vars = jax.eval_shape(lambda f, g: br.init(jax.random.key(0), f, None, g, False),
                             feats, frame)
    retrieval = self.retrieval_macs() if use_bank else 0

    def route_fn(k: int):
      def prefix(m, z):
        return m.g2d.run_blocks(m.g2d.input_conv(z), 0, k, False)

      def fn(v, x, f):
        h = model.apply(v['g2d'], x, method=prefix)
        return br.apply(v['branches'], k, h, None, f, False, method='exit')
      return fn

    out = []
    for k in br.exits:
      bp = macs.count_params(br_vars['params'][f'branches_branch_{k}'])
      used = [g2d_p['stem']] + [g2d_p[f'block{i}'] for i in range(1, k + 1)]
      out.append(macs.Route(
          f'exit{k}', route_fn(k), ({'g2d': g2d_vars, 'branches': br_vars}, g2d_in, frame),
          macs.count_params(used) + bp, (self.config.data.height, self.config.data.width),
          {'counts': 'G2D prefix + branch', 'sf': round(sf, 6), 'bank': use_bank, 'exit': k,
           'branch_params': bp, 'retrieval_gmacs': round(retrieval / 1e9, 6)}))
    return out

  def route_costs(self, use_bank: bool) -> np.ndarray:
    rows = [macs.count_macs(r.fn, *r.args) / 1e9 + r.extra.get('retrieval_gmacs', 0.0)
            for r in self.exit_routes(float(self.config.branches.sf), use_bank)]
    b = self.backbone_route()
    rows.append(macs.count_macs(b.fn, *b.args) / 1e9)
    return np.asarray(rows, np.float64)

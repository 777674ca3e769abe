"""OASIS (semantic image synthesis, Sec. 4.1) as a FIANCEE backbone.

Route inputs: (seg, z) = label map (B, H, W) ids or (B, H, W, C) one-hot, noise (B, z_dim).
Prefix: the conditioning map (z ++ one-hot, every SPADE block's `ctx`), the stem and ResBlocks
1..max(first exit, key block); the predictor reads the block-1 map, the bank is searched with
the block-`key_block` map and the majority label of each grid cell (Sec. 3.3). Shapes at the
paper size 256x512: key grid 8x16 of 1024-d keys, value patches 4x4x512 (after ResBlock 3).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fiancee_jax.backbones.oasis import bank_inputs
from fiancee_jax.backbones.oasis import discriminator as discriminator_lib
from fiancee_jax.backbones.oasis.branch_losses import OASISBranchLosses
from fiancee_jax.backbones.oasis import inputs as inputs_lib
from fiancee_jax.backbones.oasis import model as oasis
from fiancee_jax.backbones.oasis.exits import OASISBranch, OASISPredictor
from fiancee_jax.backbones.oasis.gan import OASISGAN
from fiancee_jax.backbones.oasis.predictor_rows import OASISPredictorRows
from fiancee_jax.config import oasis_widths
from fiancee_jax.core import bank as bank_lib
from fiancee_jax.core import pipeline as pl
from fiancee_jax.core.branches import BlockSpec, BranchSpec
from fiancee_jax.core.interface import Backbone, Prefix
from fiancee_jax.metrics import macs
from fiancee_jax.train.parallel import AXIS

PyTree = Any


class OASIS(Backbone):
  name = 'oasis'
  scale_factors = (1 / 2, 1 / 3, 1 / 4)   # Table 1 / Table S8 rows

  # ---------------------------------------------------------------- structure

  def blocks(self) -> list[BlockSpec]:
    d, m = self.config.data, self.config.model
    w = oasis_widths(m.ch)
    h0, w0 = d.height // 32, d.width // 32
    return [BlockSpec(w[j - 1], w[j], h0 * 2 ** (j - 1), w0 * 2 ** (j - 1),
                      'nearest' if j > 1 else None) for j in range(1, oasis.NUM_BLOCKS + 1)]

  @property
  def width_unit(self) -> int:
    return int(self.config.model.ch)

  # ---------------------------------------------------------------- modules

  def generator(self, axis_name: str | None = None) -> oasis.Generator:
    return oasis.from_config(self.config, axis_name=axis_name)

  def discriminator(self):
    return discriminator_lib.from_config(self.config)

  def branch_block(self, spec: BranchSpec, use_bank: bool,
                   axis_name: str | None = None) -> OASISBranch:
    c = self.config
    return OASISBranch(spec, c.model.spade_hidden, use_bank, axis_name,
                       jnp.bfloat16 if c.dtype == 'bfloat16' else jnp.float32)

  def predictor(self) -> OASISPredictor:
    c = self.config
    grid = (c.data.height // 32, c.data.width // 32)
    padding = 'VALID' if min(grid) >= 3 else 'SAME'
    return OASISPredictor(num_exits=len(c.branches.exits), conv_channels=c.predictor.conv_channels,
                          mlp=tuple(c.predictor.mlp), conv_padding=padding)

  # ---------------------------------------------------------------- inputs

  def abstract_inputs(self, batch: int = 1) -> tuple[jax.ShapeDtypeStruct, ...]:
    d = self.config.data
    seg = jax.ShapeDtypeStruct((batch, d.height, d.width, d.num_classes), jnp.float32)
    z = jax.ShapeDtypeStruct((batch, self.config.model.z_dim), jnp.float32)
    return seg, z

  def abstract_ctx(self, batch: int = 1) -> jax.ShapeDtypeStruct:
    d, m = self.config.data, self.config.model
    return jax.ShapeDtypeStruct((batch, d.height, d.width, m.z_dim + d.num_classes),
                                jnp.dtype(self.config.dtype))

  # ---------------------------------------------------------------- forward (eval)

  def prefix_stop(self, exits: Sequence[int], use_bank: bool) -> int:
    """The first exit, and the key block if guided."""
    stop = min(exits)
    return max(stop, self.config.bank.key_block) if use_bank else stop

  def prefix(self, gen_vars: PyTree, inputs: tuple, stop: int) -> Prefix:
    seg, z = inputs
    gen = self.generator()
    onehot = oasis.validate_inputs(seg, gen.num_classes, gen.height, gen.width)

    def f(mdl, s, zz):
      cond = mdl.make_cond(s, zz)
      fc = mdl.stem(cond)
      x, feats = mdl.run_blocks(fc, cond, 0, stop, False)
      return x, cond, {'fc': fc, **feats}
    x, cond, taps = gen.apply(gen_vars, onehot, z, method=f)
    keys = taps.get(f'block{self.config.bank.key_block}')
    query = None if keys is None else (keys, bank_lib.grid_classes(onehot, keys.shape[1:3]))
    return Prefix(x=x, ctx=cond, taps=taps, pred_in=taps.get('block1'), query=query, at=stop)

  def advance(self, gen_vars: PyTree, x: jax.Array, ctx: Any, start: int, stop: int
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    return self.generator().apply(gen_vars, x, ctx, start, stop, False, method='run_blocks')

  def head(self, gen_vars: PyTree, x: jax.Array) -> jax.Array:
    return self.generator().apply(gen_vars, x, method='head')

  # ---------------------------------------------------------------- bank

  def bank_shapes(self) -> dict[str, Any]:
    d, b = self.config.data, self.config.bank
    specs = self.blocks()
    key, val = specs[b.key_block - 1], specs[b.value_block - 1]
    return {'grid': [key.height, key.width], 'key_dim': key.fout,
            'value_shape': [val.height // key.height, val.width // key.width, val.fout],
            'num_classes': d.num_classes}

  def guide(self, bank: bank_lib.Bank, prefix: Prefix, backend: str) -> jax.Array:
    """Glued value map (B, H3, W3, Dv) of the nearest same-class keys of the key-block map."""
    queries, classes = prefix.query
    return bank_lib.retrieve(bank, queries, classes, backend=backend)

  def guide_shape(self, batch: int = 1) -> jax.ShapeDtypeStruct:
    v = self.blocks()[self.config.bank.value_block - 1]
    return jax.ShapeDtypeStruct((batch, v.height, v.width, v.fout), jnp.float32)

  def abstract_bank(self, num_keys: int | None = None) -> bank_lib.Bank:
    """Abstract arrays with num_keys (default max_per_class x num_classes) rows; the host part
    holds one dummy key per class so the FAISS backend traces (a host callback: 0 MACs)."""
    s = self.bank_shapes()
    nc, d = s['num_classes'], s['key_dim']
    n = num_keys or self.config.bank.max_per_class * nc
    host = bank_lib.BankHost(np.zeros((nc, d), np.float32), np.arange(nc, dtype=np.int32), nc)
    sds = jax.ShapeDtypeStruct
    return bank_lib.Bank(keys=sds((n, d), jnp.float32),
                         values=sds((n, *s['value_shape']), jnp.float32),
                         key_classes=sds((n,), jnp.int32), key_sqnorm=sds((n,), jnp.float32),
                         class_counts=sds((nc,), jnp.int32), class_offsets=sds((nc,), jnp.int32),
                         host=host)

  def retrieval_macs(self) -> int:
    """Exact same-class L2 search of one image's queries (Sec. 3.3): grid cells x keys of the
    largest class (<= bank.max_per_class) x key dim (an upper bound; FAISS flat search)."""
    s = self.bank_shapes()
    return int(np.prod(s['grid']) * self.config.bank.max_per_class * s['key_dim'])

  def load_bank(self, workdir: str, backbone_step: int | None, verify: bool = True,
                **select: Any) -> bank_lib.Bank:
    if select:
      raise pl.PipelineError(f'the OASIS bank takes no selection, got {sorted(select)}')
    return bank_inputs.load_bank(self.config, self.bank_shapes(), workdir, backbone_step,
                                 verify)

  def build_bank(self, workdir: str, gen_vars: PyTree, backbone_step: int | None, *,
                 force: bool, batch_size: int, progress: bool) -> dict:
    return bank_inputs.build_bank(self.config, self.bank_shapes(), workdir, gen_vars,
                                  backbone_step, force=force, batch_size=batch_size,
                                  progress=progress)

  # ---------------------------------------------------------------- training stages

  def gan_task(self, axis_name: str | None = AXIS) -> OASISGAN:
    return OASISGAN(self.config, axis_name)

  def branch_losses(self) -> OASISBranchLosses:
    return OASISBranchLosses(self.config)

  def predictor_rows(self) -> OASISPredictorRows:
    return OASISPredictorRows(self.config)

  # ---------------------------------------------------------------- inference

  def infer_inputs(self) -> inputs_lib.OASISInputs:
    return inputs_lib.OASISInputs(self.config)

  # ---------------------------------------------------------------- costs

  def _at(self, sf: float, use_bank: bool) -> 'OASIS':
    c = ml_collections.ConfigDict(self.config.to_dict())
    c.branches.sf = sf
    c.branches.use_bank = use_bank
    return OASIS(c)

  def exit_routes(self, sf: float, use_bank: bool) -> list[macs.Route]:
    """Full routes through every exit at scale factor `sf` (prefix, blocks up to k, guide,
    branch k), from the abstract pipeline; the guide is a FAISS host callback while tracing
    (0 MACs): its search bound is in 'retrieval_gmacs'."""
    at = self._at(sf, use_bank)
    p, params = pl.abstract(at, use_bank)
    inputs = at.abstract_inputs()
    gen_p, br_p = params['generator']['params'], params['branches']['params']
    ret = round(at.retrieval_macs() / 1e9, 3) if use_bank else 0.0
    out = []
    for k, fn in zip(p.exits, pl.route_fns(p, backend='faiss')[:-1]):
      bp = macs.count_params(br_p[f'branches_branch_{k}'])
      used = [gen_p[u] for u in ['fc'] + [f'body_{i}' for i in range(k)]]
      out.append(macs.Route(f'exit{k}', fn, (params, *inputs), macs.count_params(used) + bp,
                            (at.config.data.height, at.config.data.width),
                            {'sf': round(sf, 6), 'bank': use_bank, 'exit': k,
                             'branch_params': bp, 'retrieval_gmacs': ret}))
    return out

  def backbone_route(self) -> macs.Route:
    g = self.generator()
    inputs = self.abstract_inputs()
    variables = jax.eval_shape(
        lambda s, zz: g.init({'params': jax.random.key(0)}, s, zz, False), *inputs)
    fn = lambda v, s, zz: g.apply(v, s, zz, False)[0]
    return macs.Route('backbone', fn, (variables, *inputs), macs.count_params(variables['params']),
                      (self.config.data.height, self.config.data.width))

  def route_costs(self, use_bank: bool) -> np.ndarray:
    """Network GMACs (3 decimals, as the tables) + the retrieval bound of each exit route,
    then the backbone's."""
    rows = [round(macs.count_macs(r.fn, *r.args) / 1e9, 3) + r.extra['retrieval_gmacs']
            for r in self.exit_routes(float(self.config.branches.sf), use_bank)]
    b = self.backbone_route()
    rows.append(round(macs.count_macs(b.fn, *b.args) / 1e9, 3))
    return np.asarray(rows, np.float64)

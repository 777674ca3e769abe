"""What FIANCEE needs from a generator: the `Backbone` adapter interface.

The core (branches, pipeline, bank, predictor data, routing, sweep) is written once against
this class and never imports a backbone; `fiancee_jax.registry.get(config)` picks the adapter
of `config.backbone` in the entry points. A backbone is a multi-layer decoder (paper Sec. 3,
Discussion): a *prefix* shared by every route (the decoder's input and blocks 1..at), blocks
`advance`d one after another, and a `head` turning the last block's output into an image.
An exit after block k is a branch (`branch_block`) that mirrors blocks k+1..N at a scaled
width (`fiancee_jax.core.branches`), fed with block k's output, the conditioning `ctx` every
block sees, and, when guided, the `guide` retrieved from the bank by the prefix's query.

Shapes are NHWC; images (B, H, W, 3) float32 in [-1, 1]; everything here is eval mode and
pure (params are jit arguments, never closed over).
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax import struct

from fiancee_jax.core.branches import BlockSpec, BranchSpec, Branches, branch_spec

PyTree = Any


@struct.dataclass
class Prefix:
  """What every route of one batch shares, computed once (Sec. 3.2, the routed prefix).

  x        features after block `at` (at 0: the decoder's input, before block 1)
  ctx      conditioning every later block and every branch takes (OASIS: z ++ one-hot map;
           None for a decoder without one)
  taps     {'block{k}': block k's output} for the blocks the prefix ran (k <= at)
  pred_in  the predictor's input (OASIS: the block-1 map; heads: the driver's motion key)
  query    what the adapter's `guide` searches the bank with (None: the backbone has no bank)
  """
  x: jax.Array
  ctx: Any
  taps: dict[str, jax.Array]
  pred_in: jax.Array
  query: Any
  at: int = struct.field(pytree_node=False)


class Backbone(abc.ABC):
  """A generator adapted to FIANCEE. One instance per experiment config (`self.config`)."""

  name: ClassVar[str]                          # the config.backbone it adapts
  scale_factors: ClassVar[tuple[float, ...]]   # branch SFs the GMAC tables list
  has_bank: ClassVar[bool] = True              # False: the backbone cannot be guided

  def __init__(self, config):
    self.config = config

  # ---------------------------------------------------------------- structure

  @abc.abstractmethod
  def blocks(self) -> list[BlockSpec]:
    """The decoder's blocks 1..N in order (branch specs derive from them)."""

  @property
  def width_unit(self) -> int | None:
    """Branch widths are rounded to multiples of it (None: no rounding)."""
    return None

  @property
  def num_blocks(self) -> int:
    return len(self.blocks())

  @property
  def exits(self) -> tuple[int, ...]:
    return tuple(sorted(int(k) for k in self.config.branches.exits))

  def branch_specs(self, sf: float | None = None) -> dict[int, BranchSpec]:
    """{exit block k: the blocks of its branch} (Tables S8 / S9 rule, at `sf`)."""
    b = self.config.branches
    sf = b.sf if sf is None else sf
    unit = self.width_unit
    return {k: branch_spec(self.blocks(), k, sf, b.min_channels, unit) for k in self.exits}

  # ---------------------------------------------------------------- modules

  @abc.abstractmethod
  def generator(self, axis_name: str | None = None) -> nn.Module:
    """The backbone generator (axis_name: the data-parallel axis of sync batch norm)."""

  def init_generator(self, rng: jax.Array, inputs: tuple) -> PyTree:
    """Fresh generator variables from route inputs (abstract ones with `jax.eval_shape`)."""
    return self.generator().init({'params': rng}, *inputs, False)

  @abc.abstractmethod
  def discriminator(self) -> nn.Module:
    """The backbone's discriminator (branch training gives each exit a copy)."""

  @abc.abstractmethod
  def branch_block(self, spec: BranchSpec, use_bank: bool,
                   axis_name: str | None = None) -> nn.Module:
    """One exit's branch: `(x, ctx, guide, train) -> image` from block k's output."""

  def branches(self, use_bank: bool | None = None, axis_name: str | None = None,
               sf: float | None = None) -> Branches:
    """Every configured exit's branch in one container (`branches_branch_{k}`)."""
    use_bank = self.config.branches.use_bank if use_bank is None else use_bank
    use_bank = bool(use_bank) and self.has_bank
    specs = tuple(sorted(self.branch_specs(sf).items()))
    return Branches(specs=tuple((k, self.branch_block(s, use_bank, axis_name)) for k, s in specs),
                    use_bank=use_bank)

  @abc.abstractmethod
  def predictor(self) -> nn.Module:
    """The exit-quality predictor: `pred_in -> (B, E)` predicted LPIPS of every exit."""

  # ---------------------------------------------------------------- inputs

  @abc.abstractmethod
  def abstract_inputs(self, batch: int = 1) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The route inputs as abstract arrays (init, eval_shape, GMACs)."""

  def abstract_ctx(self, batch: int = 1) -> jax.ShapeDtypeStruct | None:
    """Shape of the prefix's `ctx` (None: the decoder's blocks take no conditioning)."""
    return None

  # ---------------------------------------------------------------- forward (eval)

  @abc.abstractmethod
  def prefix_stop(self, exits: Sequence[int], use_bank: bool) -> int:
    """Last block of the shared prefix for these exits (0: none of the blocks)."""

  @abc.abstractmethod
  def prefix(self, gen_vars: PyTree, inputs: tuple, stop: int) -> Prefix:
    """The shared prefix of a batch of route inputs, through block `stop`."""

  @abc.abstractmethod
  def advance(self, gen_vars: PyTree, x: jax.Array, ctx: Any, start: int, stop: int
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Blocks start+1..stop from block `start`'s output: (block stop's output, taps)."""

  @abc.abstractmethod
  def head(self, gen_vars: PyTree, x: jax.Array) -> jax.Array:
    """The image from the last block's output."""

  # ---------------------------------------------------------------- bank

  def bank_shapes(self) -> dict[str, Any]:
    """Manifest fields a bank for this config must have (grid, key_dim, value_shape,
    num_classes)."""
    raise NotImplementedError(f'{self.name}: no bank')

  def guide(self, bank: PyTree, prefix: Prefix, backend: str) -> jax.Array:
    """The guide of every example from the loaded bank (`load_bank`) and the prefix's query."""
    raise NotImplementedError(f'{self.name}: no bank')

  def guide_shape(self, batch: int = 1) -> jax.ShapeDtypeStruct:
    """Shape of `guide`'s output (branch init)."""
    raise NotImplementedError(f'{self.name}: no bank')

  def abstract_bank(self) -> PyTree:
    """A bank of this config's layout with abstract arrays (GMAC counting)."""
    raise NotImplementedError(f'{self.name}: no bank')

  def retrieval_macs(self) -> int:
    """Upper bound of one input's exact nearest-key search (reported beside GMACs)."""
    return 0

  def load_bank(self, workdir: str, backbone_step: int | None, verify: bool = True,
                **select: Any) -> PyTree:
    """The bank stage's output in `workdir`, as the pytree `guide` takes."""
    raise NotImplementedError(f'{self.name}: no bank')

  def build_bank(self, workdir: str, gen_vars: PyTree, backbone_step: int | None, *,
                 force: bool, batch_size: int, progress: bool) -> Any:
    """The bank stage (build_bank.py): banks of this backbone under `<workdir>/bank`."""
    raise NotImplementedError(f'{self.name}: no bank')

  # ---------------------------------------------------------------- training stages

  def gan_task(self, axis_name: str | None = 'data') -> Any:
    """This backbone's part of the backbone stage (`fiancee_jax.train.gan`, Sec. 4.1 / 4.2):
    a `train.gan.GANTask` — generator + discriminator and their optimisers, the per-device
    train step (sync BN and gradient means over `axis_name`; None: one device), the loader
    batches it reads, the BN-refresh inputs and the sample rows and grid. The driver owns
    the loop, checkpoints, samples and data parallelism."""
    raise NotImplementedError(f'{self.name}: no backbone training stage')

  def branch_losses(self) -> Any:
    """This backbone's part of the branch stage (`fiancee_jax.train.branches`, Sec. 3.1): a
    `train.branches.BranchLosses` — the branch and discriminator losses (one discriminator
    copy per exit), their optimisers, how a loader batch becomes route inputs, the sample
    rows and grid. The driver runs the frozen backbone through `core.pipeline` itself.
    A backbone whose branches are not trained here may leave it out."""
    raise NotImplementedError(f'{self.name}: no branch stage (Backbone.branch_losses)')

  def predictor_rows(self) -> Any:
    """What a predictor dataset row is (`fiancee_jax.core.predictor_data`, Sec. 3.2): a
    `core.predictor_data.PredictorRows` — each split's rows (index arrays), the host inputs
    they are computed from, the jittable map from those to route inputs and the predictor
    input's shape. A backbone without a predictor stage may leave it out."""
    raise NotImplementedError(f'{self.name}: no predictor datasets (Backbone.predictor_rows)')

  # ---------------------------------------------------------------- inference

  def infer_inputs(self) -> Any:
    """What inference reads for this backbone (`fiancee_jax.infer`): a
    `fiancee_jax.infer.inputs.BackboneInputs` that turns infer.py's input flags into route
    inputs (`from_flags`, checked before any stage loads), predictor split rows into route
    inputs (`from_rows`), and says the sample grid's input columns and the report's kind.
    A backbone used only through the Python API may leave it out."""
    raise NotImplementedError(f'{self.name}: no infer.py inputs')

  # ---------------------------------------------------------------- costs

  @abc.abstractmethod
  def backbone_route(self) -> Any:
    """The backbone's `metrics.macs.Route` (what the paper's tables count as the backbone)."""

  @abc.abstractmethod
  def exit_routes(self, sf: float, use_bank: bool) -> list:
    """A `metrics.macs.Route` through every exit at scale factor `sf`, bank off or on."""

  def flops_routes(self) -> list:
    """Every route the GMAC tables list: the backbone, then every exit for each of
    `scale_factors` (and config.branches.sf), bank off and on (the flops CLI)."""
    sfs = list(self.scale_factors)
    if not any(abs(self.config.branches.sf - s) < 1e-9 for s in sfs):
      sfs.append(float(self.config.branches.sf))
    banks = (False, True) if self.has_bank else (False,)
    return [self.backbone_route()] + [r for sf in sfs for use_bank in banks
                                      for r in self.exit_routes(sf, use_bank)]

  @abc.abstractmethod
  def route_costs(self, use_bank: bool) -> np.ndarray:
    """GMACs (E+1,) of every route at config.branches.sf, exits in order then the backbone,
    counted like the paper's tables (network + the retrieval bound when guided): what the
    router minimises."""

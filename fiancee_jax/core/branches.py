"""Exit branches (paper Sec. 3.1, Tables S8 / S9), written once for every backbone.

A branch attached after backbone block k mirrors the backbone's remaining blocks k+1..N at the
same resolutions, with every block's output width scaled by SF and never below min_channels
(`fiancee_jax.config.scaled_width`); its first block takes the backbone's unscaled feature.
An adapter describes its decoder as a list of `BlockSpec` (`Backbone.blocks`), `branch_spec`
derives a branch from it, and `Branches` holds one branch block per exit, built by the
adapter (`Backbone.branch_block`): OASIS's SPADE-ResBlocks and G2D's ResBlock2D share the rule
and the container.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

from fiancee_jax.config import scaled_width


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  fin: int                 # input channels (without guidance)
  fout: int                # output channels
  height: int              # resolution the block runs at
  width: int
  upsample: str | None     # resize applied to the block's input: 'nearest' | 'bilinear' | None


BranchSpec = tuple[BlockSpec, ...]


def branch_spec(blocks: Sequence[BlockSpec], exit_block: int, sf: float, min_channels: int,
                unit: int | None = None) -> BranchSpec:
  """Blocks of the branch after backbone block `exit_block` (1-based): depth N - k."""
  if not 1 <= exit_block < len(blocks):
    raise ValueError(f'exit after block {exit_block}: expected 1..{len(blocks) - 1}')
  fin = blocks[exit_block - 1].fout
  out = []
  for b in blocks[exit_block:]:
    fout = scaled_width(b.fout, sf, min_channels, unit)
    out.append(BlockSpec(fin, fout, b.height, b.width, b.upsample))
    fin = fout
  return tuple(out)


class Branches(nn.Module):
  """Every exit of a backbone; `branch_{k}` is the exit after block k. Each branch block is
  `(x, ctx, guide, train) -> image` (`Backbone.branch_block`)."""
  specs: tuple[tuple[int, nn.Module], ...]   # ((k, unbound branch block), ...) ordered by k
  use_bank: bool = True

  def setup(self):
    self.branches = {f'branch_{k}': block.clone() for k, block in self.specs}

  @property
  def exits(self) -> tuple[int, ...]:
    return tuple(k for k, _ in self.specs)

  def exit(self, k: int, x: jax.Array, ctx: Any = None, guide: jax.Array | None = None,
           train: bool = False) -> jax.Array:
    """Image of the exit after block k from that block's output x."""
    return self.branches[f'branch_{k}'](x, ctx, guide, train)

  def __call__(self, feats: dict[str, jax.Array], ctx: Any = None,
               guide: jax.Array | None = None, train: bool = False) -> dict[int, jax.Array]:
    """{k: image} for every exit, from the backbone's block features."""
    return {k: self.exit(k, feats[f'block{k}'], ctx, guide, train) for k, _ in self.specs}


def copy_overlap(dst: Any, src: Any, fill: float = 0.0) -> np.ndarray:
  """A `dst`-shaped array holding `src`'s leading block along every axis (channel slicing,
  as slimmable / once-for-all networks take a narrower layer from a wider one) and `fill`
  where `dst` is the wider one (e.g. a branch's extra guide-input channels)."""
  dst, src = np.asarray(dst), np.asarray(src)
  if dst.ndim != src.ndim:
    raise ValueError(f'copy_overlap: rank {dst.ndim} {dst.shape} vs source {src.shape}')
  out = np.full(dst.shape, fill, dst.dtype)
  idx = tuple(slice(0, min(a, b)) for a, b in zip(dst.shape, src.shape))
  out[idx] = src[idx]
  return out

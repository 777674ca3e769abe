"""Exit branches (paper Sec. 3.1, Tables S8 / S9), generic over backbones.

A branch attached after backbone block k mirrors the backbone's remaining blocks k+1..N at the
same resolutions, with every block's output width scaled by SF and never below min_channels
(`fiancee_jax.config.scaled_width`); its first block takes the backbone's unscaled feature.
`backbone_blocks(config)` describes the backbone as a list of `BlockSpec`, `branch_spec`
derives a branch from it, so OASIS (SPADE-ResBlocks, nearest x2) and G2D (ResBlock2D,
bilinear x2) share one rule.

Guidance by the bank (Sec. 3.3):
  OASIS: the glued value map (after ResBlock 3) is passed through a conv3x3 at its own
    resolution to fin/2 channels, nearest-resized to the branch input and concatenated, so the
    first block's input is fin x 1.5 (Table S8 caption).
  G2D: the retrieved RGB frame, bilinearly resized, is concatenated to the input of every
    branch block (+3 channels, Table S9 caption).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fiancee_jax.config import oasis_widths, scaled_width
from fiancee_jax.nn.layers import SNConv, SPADEResBlock, nearest_down, up2
from fiancee_jax.backbones.megaportraits.model import (ResBlock2D, downsample_bilinear, dtype_of,
                                              to_image, upsample_bilinear2x)

Dtype = Any


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  fin: int                 # input channels (without guidance)
  fout: int                # output channels
  height: int              # resolution the block runs at
  width: int
  upsample: str | None     # resize applied to the block's input: 'nearest' | 'bilinear' | None


def backbone_blocks(config) -> list[BlockSpec]:
  """The backbone's blocks 1..N (1-based order) for `config.backbone`."""
  d, m = config.data, config.model
  if config.backbone == 'oasis':
    w = oasis_widths(m.ch)
    h0, w0 = d.height // 32, d.width // 32
    return [BlockSpec(w[j - 1], w[j], h0 * 2 ** (j - 1), w0 * 2 ** (j - 1),
                      'nearest' if j > 1 else None) for j in range(1, 7)]
  if config.backbone == 'megaportraits':
    base = d.height // 8
    blocks = [BlockSpec(m.ch, m.ch, base, base, None) for _ in range(m.num_res)]
    fin = m.ch
    for i, fout in enumerate(m.up_channels):
      blocks.append(BlockSpec(fin, fout, base * 2 ** (i + 1), base * 2 ** (i + 1), 'bilinear'))
      fin = fout
    return blocks
  raise ValueError(f'backbone {config.backbone!r}: expected oasis or megaportraits')


def branch_spec(blocks: Sequence[BlockSpec], exit_block: int, sf: float, min_channels: int,
                unit: int | None = None) -> tuple[BlockSpec, ...]:
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


def specs_from_config(config, sf: float | None = None) -> dict[int, tuple[BlockSpec, ...]]:
  """{exit block k: branch spec} for every configured exit (at `sf`, default branches.sf)."""
  b = config.branches
  unit = config.model.ch if config.backbone == 'oasis' else None
  blocks = backbone_blocks(config)
  sf = b.sf if sf is None else sf
  return {k: branch_spec(blocks, k, sf, b.min_channels, unit) for k in b.exits}


class OASISBranch(nn.Module):
  """SPADE-ResBlock branch; input = backbone block k output (before its upsampling)."""
  spec: tuple[BlockSpec, ...]
  spade_hidden: int = 128
  use_bank: bool = True
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array, guide: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    if self.use_bank and guide is None:
      raise ValueError('OASISBranch(use_bank=True) needs the guide feature from the bank')
    for i, b in enumerate(self.spec):
      if b.upsample:
        x = up2(x)
      fin = b.fin
      if i == 0 and self.use_bank:
        g = SNConv(b.fin // 2, 3, spectral_norm=False, dtype=self.dtype, name='guide_conv')(guide)
        g = _nearest_resize(g, x.shape[1:3]).astype(x.dtype)
        x = jnp.concatenate([x, g], axis=-1)
        fin = b.fin + b.fin // 2
      x = SPADEResBlock(fin, b.fout, self.spade_hidden, axis_name=self.axis_name,
                        dtype=self.dtype, name=f'body_{i}')(x, cond, train)
    x = SNConv(3, 3, spectral_norm=False, dtype=self.dtype, name='conv_img')(
        nn.leaky_relu(x, 0.2))
    return jnp.tanh(x.astype(jnp.float32))


def _nearest_resize(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Nearest resize by integer factors: strided slicing down, repeat up."""
  h, w = int(size[0]), int(size[1])
  if x.shape[1] >= h:
    return nearest_down(x, (h, w))
  fy, fx = h // x.shape[1], w // x.shape[2]
  return jnp.repeat(jnp.repeat(x, fy, axis=1), fx, axis=2)


class OASISBranches(nn.Module):
  """All exits of an OASIS backbone; `branch_{k}` is the exit after ResBlock k."""
  specs: tuple[tuple[int, tuple[BlockSpec, ...]], ...]   # ((k, spec), ...) ordered by k
  spade_hidden: int = 128
  use_bank: bool = True
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  def setup(self):
    self.branches = {f'branch_{k}': OASISBranch(spec, self.spade_hidden, self.use_bank,
                                                 self.axis_name, self.dtype)
                     for k, spec in self.specs}

  def exit(self, k: int, x: jax.Array, cond: jax.Array, guide: jax.Array | None = None,
           train: bool = False) -> jax.Array:
    """Image of the exit after block k from that block's output x."""
    return self.branches[f'branch_{k}'](x, cond, guide, train)

  def __call__(self, feats: dict[str, jax.Array], cond: jax.Array,
               guide: jax.Array | None = None, train: bool = False) -> dict[int, jax.Array]:
    """{k: image} for every exit, from the backbone's block features."""
    return {k: self.exit(k, feats[f'block{k}'], cond, guide, train) for k, _ in self.specs}


def oasis_branches_from_config(config, axis_name: str | None = None,
                               use_bank: bool | None = None) -> OASISBranches:
  specs = specs_from_config(config)
  return OASISBranches(
      specs=tuple(sorted(specs.items())), spade_hidden=config.model.spade_hidden,
      use_bank=config.branches.use_bank if use_bank is None else use_bank, axis_name=axis_name,
      dtype=jnp.bfloat16 if config.dtype == 'bfloat16' else jnp.float32)


# ----------------------------------------------------------------------------- G2D (heads)

FRAME_CHANNELS = 3   # the bank's RGB frame concatenated to every G2D branch block input


class G2DBranch(nn.Module):
  """ResBlock2D branch of G2D (Table S9); input = backbone block k output. Each block:
  bilinear x2 where the spec says so, [++ bank frame resized to that resolution], ResBlock2D;
  then G2D's head (ReLU, conv3x3, tanh)."""
  spec: tuple[BlockSpec, ...]
  use_bank: bool = True
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, frame: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    if self.use_bank and (frame is None or frame.ndim != 4
                          or frame.shape[-1] != FRAME_CHANNELS):
      got = None if frame is None else tuple(frame.shape)
      raise ValueError(f'G2DBranch(use_bank=True): expected the bank frame (B, H, W, 3), '
                       f'got {got}')
    for i, b in enumerate(self.spec):
      if b.upsample == 'bilinear':
        x = upsample_bilinear2x(x)
      elif b.upsample is not None:
        raise ValueError(f'G2DBranch block {i}: upsample={b.upsample!r}, expected bilinear')
      fin = b.fin
      if self.use_bank:  # Table S9 caption: +3 input channels in every block
        g = downsample_bilinear(frame, x.shape[1:3]).astype(x.dtype)
        x = jnp.concatenate([x, g], axis=-1)
        fin += FRAME_CHANNELS
      x = ResBlock2D(fin, b.fout, self.axis_name, self.dtype, name=f'block_{i}')(x, train)
    return to_image(nn.Conv(3, (3, 3), padding=1, dtype=self.dtype, name='out_conv'), x)


class G2DBranches(nn.Module):
  """All exits of G2D; `branch_{k}` is the exit after ResBlock2D k (paper: 2, 4, 6)."""
  specs: tuple[tuple[int, tuple[BlockSpec, ...]], ...]   # ((k, spec), ...) ordered by k
  use_bank: bool = True
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  def setup(self):
    self.branches = {f'branch_{k}': G2DBranch(spec, self.use_bank, self.axis_name, self.dtype)
                     for k, spec in self.specs}

  def exit(self, k: int, x: jax.Array, frame: jax.Array | None = None,
           train: bool = False) -> jax.Array:
    """Image of the exit after block k from that block's output x (frame: the bank's)."""
    return self.branches[f'branch_{k}'](x, frame, train)

  def __call__(self, feats: dict[str, jax.Array], frame: jax.Array | None = None,
               train: bool = False) -> dict[int, jax.Array]:
    """{k: image} for every exit, from G2D's block features."""
    return {k: self.exit(k, feats[f'block{k}'], frame, train) for k, _ in self.specs}


def g2d_branches_from_config(config, axis_name: str | None = None,
                             use_bank: bool | None = None,
                             sf: float | None = None) -> G2DBranches:
  """G2DBranches of a `base_megaportraits()` config (sf / use_bank default to config's)."""
  if config.backbone != 'megaportraits':
    raise ValueError(f'g2d_branches_from_config: config.backbone={config.backbone!r}, '
                     "expected 'megaportraits'")
  specs = specs_from_config(config, sf)
  return G2DBranches(
      specs=tuple(sorted(specs.items())),
      use_bank=config.branches.use_bank if use_bank is None else use_bank, axis_name=axis_name,
      dtype=dtype_of(config.dtype))

"""GMACs and parameter counts of any of our modules, from shapes only.

The paper reports "GFLOPs" that are multiply-accumulates (OASIS Cityscapes: 318.6 GMACs at
256x512, Table 1). `count_macs` traces a function with `jax.make_jaxpr` (abstract inputs are
fine: nothing runs) and sums the MACs of every `conv_general_dilated` (output elements x
kernel taps x cin/groups) and `dot_general` (output elements x contracted size), recursing
into sub-jaxprs (pjit, custom_jvp/vjp, remat, closed_call, shard_map; scan bodies x length,
the costliest cond branch). By default the count includes taps that fall on zero padding
(the paper's convention, as PyTorch counters do); `count_padded=False` counts only taps on
real input, which is what XLA's `cost_analysis()['flops'] / 2` reports (tests check both).

Every route a backbone adapter counts is a `Route`; `python -m fiancee_jax.metrics.flops` prints them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import numpy as np


# ----------------------------------------------------------------------------- counting

def _valid_taps_1d(n: int, k: int, stride: int, pad: tuple[int, int], lhs_dil: int,
                   rhs_dil: int, out: int) -> int:
  """Number of (output position, kernel tap) pairs of one spatial dim landing on real input."""
  i = np.arange(out)[:, None]
  j = np.arange(k)[None, :]
  p = i * stride + j * rhs_dil - pad[0]
  ok = (p >= 0) & (p <= (n - 1) * lhs_dil) & (p % lhs_dil == 0)
  return int(ok.sum())


def _conv_macs(eqn, count_padded: bool) -> int:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  out = eqn.outvars[0].aval
  dn = eqn.params['dimension_numbers']
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  cin_per_group = rhs.shape[rhs_spec[1]]
  if count_padded:
    taps = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    return int(math.prod(out.shape) * taps * cin_per_group)
  nsp = len(rhs_spec) - 2
  strides = eqn.params['window_strides']
  padding = eqn.params['padding']
  lhs_dil = eqn.params.get('lhs_dilation') or (1,) * nsp
  rhs_dil = eqn.params.get('rhs_dilation') or (1,) * nsp
  pairs = 1
  for s in range(nsp):
    pairs *= _valid_taps_1d(lhs.shape[lhs_spec[2 + s]], rhs.shape[rhs_spec[2 + s]], strides[s],
                            tuple(padding[s]), lhs_dil[s], rhs_dil[s], out.shape[out_spec[2 + s]])
  batch = out.shape[out_spec[0]]
  cout = out.shape[out_spec[1]]
  return int(batch * cout * pairs * cin_per_group)


def _dot_macs(eqn) -> int:
  lhs = eqn.invars[0].aval
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  out = eqn.outvars[0].aval
  return int(math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract))


def _sub_jaxprs(value: Any):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _jaxpr_macs(jaxpr, count_padded: bool) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      total += _conv_macs(eqn, count_padded)
    elif name == 'dot_general':
      total += _dot_macs(eqn)
    elif name == 'cond':
      total += max((_jaxpr_macs(j, count_padded) for j in _sub_jaxprs(eqn.params['branches'])),
                   default=0)
    elif name == 'scan':
      total += eqn.params['length'] * _jaxpr_macs(eqn.params['jaxpr'].jaxpr, count_padded)
    else:  # pjit, closed_call, custom_jvp/vjp, remat, shard_map, while (counted once)...
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          total += _jaxpr_macs(sub, count_padded)
  return total


def count_macs(apply_fn: Callable, *args: Any, count_padded: bool = True) -> int:
  """Multiply-accumulates of `apply_fn(*args)` from shapes (args may be ShapeDtypeStructs).

  count_padded=True (paper/PyTorch-counter convention) counts every kernel tap;
  False counts only taps on real (non-padding) input, like XLA's cost analysis.
  """
  closed = jax.make_jaxpr(apply_fn)(*args)
  return _jaxpr_macs(closed.jaxpr, count_padded)


def count_params(params: Any) -> int:
  """Number of scalars in a pytree (concrete arrays or ShapeDtypeStructs)."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------- routes

@dataclasses.dataclass
class Route:
  """One inference path to count: `fn(*args)` with abstract args; `params` the trainable
  scalars it uses; `extra` more JSON fields (exit index, scale factor...)."""
  name: str
  fn: Callable
  args: tuple
  params: int
  resolution: tuple[int, int]
  extra: dict = dataclasses.field(default_factory=dict)

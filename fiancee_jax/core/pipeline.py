"""The FIANCEE pipeline: backbone + guiding bank + exit branches (+ predictor), assembled once.

Every later stage (branch training, predictor data, inference, benchmarks, the report) goes
through these pure functions, for any `Backbone` adapter. Params are a pytree passed as a jit
argument, never closed over:

  params = {'generator': backbone variables (EMA weights, refreshed BN stats),
            'branches':  `core.branches.Branches` variables,
            'predictor': predictor variables or None,
            'bank':      what `Backbone.load_bank` returned (a `core.bank.Bank` pytree) or None}

A route through exit k = the shared prefix (`Backbone.prefix`, computed once per batch) ->
backbone blocks up to k (`continue_to`, from the deepest block the prefix holds) -> the guide
(the bank searched with the prefix's query) -> branch k (Sec. 3.1). The backbone's own route
continues to block N and applies the head. No route recomputes the prefix.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from fiancee_jax.core.interface import Backbone, Prefix
from fiancee_jax.errors import FianceeError

PyTree = Any


class PipelineError(FianceeError):
  """A stage of the pipeline is missing or does not fit the config."""


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
  """Static half of the assembled pipeline (adapter, modules, costs); hashed by identity so
  it can be a static jit argument. `params` is the default params pytree (pass it, or a
  replacement, explicitly to the functions below)."""
  backbone: Backbone
  generator: nn.Module
  branches: nn.Module
  predictor: nn.Module | None
  params: dict[str, PyTree]
  costs: np.ndarray                    # (E+1,) GMACs of each full route, exits then backbone
  exits: tuple[int, ...]               # block index of each exit, increasing

  @property
  def config(self):
    return self.backbone.config

  @property
  def use_bank(self) -> bool:
    return bool(self.branches.use_bank)

  @property
  def route_names(self) -> list[str]:
    return [f'exit{k}' for k in self.exits] + ['backbone']


# ------------------------------------------------------------------------------ forward

def prefix(pipeline: Pipeline, params: dict, *inputs: Any) -> Prefix:
  """The prefix every route shares: through the first exit (and the bank's key block when
  guided), eval mode."""
  stop = pipeline.backbone.prefix_stop(pipeline.exits, pipeline.use_bank)
  return pipeline.backbone.prefix(params['generator'], tuple(inputs), stop)


def continue_to(pipeline: Pipeline, params: dict, pre: Prefix, k: int
                ) -> tuple[jax.Array, Prefix]:
  """Block k's output from the prefix (a tap, or the blocks after `pre.at`), and the prefix
  advanced to block k (so the next, deeper exit continues from there)."""
  key = f'block{k}'
  if key in pre.taps:
    return pre.taps[key], pre
  if k < pre.at:
    raise PipelineError(f'block {k} is inside the prefix (through block {pre.at}) but was '
                        'not kept')
  x, taps = pipeline.backbone.advance(params['generator'], pre.x, pre.ctx, pre.at, k)
  return x, pre.replace(x=x, taps={**pre.taps, **taps}, at=k)


def guide(pipeline: Pipeline, params: dict, pre: Prefix, backend: str | None = None
          ) -> jax.Array | None:
  """What the bank gives each example (None when the branches are unguided). `backend`
  overrides config.bank.backend."""
  if not pipeline.use_bank:
    return None
  bank = params.get('bank')
  if bank is None:
    raise PipelineError('guided branches need params["bank"]: load the pipeline with the '
                        "'bank' stage (build_bank.py)")
  return pipeline.backbone.guide(bank, pre, backend or pipeline.config.bank.backend)


def branch_image(pipeline: Pipeline, params: dict, k: int, x: jax.Array, pre: Prefix,
                 g: jax.Array | None) -> jax.Array:
  """Exit k's image from block k's output x."""
  return pipeline.branches.apply(params['branches'], k, x, pre.ctx, g, False, method='exit')


def head_image(pipeline: Pipeline, params: dict, pre: Prefix) -> jax.Array:
  """The backbone's own image, continuing the prefix to the last block."""
  x, _ = continue_to(pipeline, params, pre, pipeline.backbone.num_blocks)
  return pipeline.backbone.head(params['generator'], x)


def route_image(pipeline: Pipeline, params: dict, route: int, pre: Prefix,
                g: jax.Array | None) -> jax.Array:
  """Image of route `route` (index into pipeline.exits; len(exits) = the backbone) from the
  prefix and its guide."""
  if route == len(pipeline.exits):
    return head_image(pipeline, params, pre)
  k = pipeline.exits[route]
  x, _ = continue_to(pipeline, params, pre, k)
  return branch_image(pipeline, params, k, x, pre, g)


def exit_image(pipeline: Pipeline, params: dict, k: int, *inputs: Any,
               backend: str | None = None) -> jax.Array:
  """Image (B, H, W, 3) in [-1, 1] of the full route through exit k."""
  if k not in pipeline.exits:
    raise PipelineError(f'exit {k}: this pipeline has exits {pipeline.exits}')
  pre = prefix(pipeline, params, *inputs)
  return route_image(pipeline, params, pipeline.exits.index(k), pre,
                     guide(pipeline, params, pre, backend))


def backbone_image(pipeline: Pipeline, params: dict, *inputs: Any) -> jax.Array:
  """The backbone's own image (the route without an early exit)."""
  return head_image(pipeline, params, prefix(pipeline, params, *inputs))


def all_from_prefix(pipeline: Pipeline, params: dict, pre: Prefix, g: jax.Array | None
                    ) -> list[jax.Array]:
  """Every route's image in route order (exits, then the backbone), each backbone block run
  once."""
  out = []
  for k in pipeline.exits:
    x, pre = continue_to(pipeline, params, pre, k)
    out.append(branch_image(pipeline, params, k, x, pre, g))
  out.append(head_image(pipeline, params, pre))
  return out


def all_images(pipeline: Pipeline, params: dict, *inputs: Any, backend: str | None = None
               ) -> dict[Any, jax.Array]:
  """{k: image of exit k, ..., 'backbone': image, 'pred_in': the predictor input, 'guide':
  the retrieved guide (guided only)} in one pass: the prefix, the guide and every backbone
  block are computed once."""
  pre = prefix(pipeline, params, *inputs)
  g = guide(pipeline, params, pre, backend)
  images = all_from_prefix(pipeline, params, pre, g)
  out: dict[Any, jax.Array] = dict(zip(list(pipeline.exits) + ['backbone'], images))
  out['pred_in'] = pre.pred_in
  if g is not None:
    out['guide'] = g
  return out


def predict(pipeline: Pipeline, params: dict, pre: Prefix) -> jax.Array:
  """Predicted LPIPS (B, E) of every exit from the prefix's predictor input."""
  if pipeline.predictor is None or params.get('predictor') is None:
    raise PipelineError("no predictor: load the pipeline with the 'predictor' stage "
                        '(train.py --stage=predictor)')
  return pipeline.predictor.apply(params['predictor'], pre.pred_in)


def route_fns(pipeline: Pipeline, backend: str | None = None
              ) -> list[Callable[..., jax.Array]]:
  """One jittable `fn(params, *inputs) -> image` per exit (in order), then the backbone's;
  each computes only its own route."""
  def fn(route, params, *inputs):
    pre = prefix(pipeline, params, *inputs)
    g = guide(pipeline, params, pre, backend) if route < len(pipeline.exits) else None
    return route_image(pipeline, params, route, pre, g)
  return [functools.partial(fn, r) for r in range(len(pipeline.exits) + 1)]


# ------------------------------------------------------------------------------ assembly

def init_branches(backbone: Backbone, branches: nn.Module, rng: jax.Array) -> PyTree:
  """Fresh branch variables, shaped by the backbone's block features (batch 1, zeros)."""
  blocks = backbone.blocks()
  feats = {f'block{k}': jax.numpy.zeros((1, blocks[k - 1].height, blocks[k - 1].width,
                                         blocks[k - 1].fout), jax.numpy.float32)
           for k in branches.exits}
  ctx = backbone.abstract_ctx(1)
  ctx = None if ctx is None else jax.numpy.zeros(ctx.shape, ctx.dtype)
  g = None
  if branches.use_bank:
    s = backbone.guide_shape(1)
    g = jax.numpy.zeros(s.shape, s.dtype)
  return branches.init({'params': rng}, feats, ctx, g, False)


def abstract(backbone: Backbone, use_bank: bool, sf: float | None = None
             ) -> tuple[Pipeline, dict]:
  """A pipeline of abstract arrays (shapes only: GMAC counting, eval_shape)."""
  gen = backbone.generator()
  br = backbone.branches(use_bank=use_bank, sf=sf)
  inputs = backbone.abstract_inputs()
  g_vars = jax.eval_shape(lambda *x: backbone.init_generator(jax.random.key(0), x), *inputs)
  b_vars = jax.eval_shape(functools.partial(init_branches, backbone, br), jax.random.key(0))
  bank = backbone.abstract_bank() if br.use_bank else None
  params = {'generator': g_vars, 'branches': b_vars, 'predictor': None, 'bank': bank}
  p = Pipeline(backbone, gen, br, None, params, np.zeros(len(backbone.exits) + 1),
               backbone.exits)
  return p, params

"""The FIANCEE pipeline: backbone + guiding bank + exit branches (+ predictor), assembled once.

Every later stage (branch training, predictor data, inference, benchmarks, the report) goes
through these pure functions. Params are a pytree passed as a jit argument, never closed
over:

  params = {'generator': OASIS variables {'params', 'batch_stats', 'spectral'} (EMA weights,
                         refreshed BN stats),
            'branches':  OASISBranches variables,
            'predictor': predictor variables or None,
            'bank':      fiancee_jax.bank.Bank (arrays pytree, static host part) or None}

Shapes (OASIS, paper size 256x512): the shared prefix is the stem + ResBlocks 1..max(first
exit, key block); bank keys are the block-1 map (8x16 grid, 1024-d), values the block-3 map
(32x64x512) cut on the same grid into 4x4 patches, classes the majority label of each
grid cell (Sec. 3.3, 4.1, S1.1.1). A route through exit k = prefix -> backbone blocks up to
k -> guide (bank retrieval on the block-1 map) -> branch k (Sec. 3.1).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fiancee_jax.core import bank as bank_lib
from fiancee_jax import config as cfg
from fiancee_jax import io_utils
from fiancee_jax.models import branches as branches_lib
from fiancee_jax.backbones.oasis import model as oasis
from fiancee_jax.errors import FianceeError

PyTree = Any
STAGES = ('backbone', 'bank', 'branches', 'predictor')
SCALE_FACTORS = (1 / 2, 1 / 3, 1 / 4)   # Table 1 / Table S8 rows


class PipelineError(FianceeError):
  """A stage of the pipeline is missing or does not fit the config."""


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
  """Static half of the assembled pipeline (modules, config, costs); hashed by identity so
  it can be a static jit argument. `params` is the default params pytree (pass it, or a
  replacement, explicitly to the functions below)."""
  config: ml_collections.ConfigDict
  generator: nn.Module
  branches: nn.Module
  predictor: nn.Module | None
  bank: bank_lib.Bank | None
  params: dict[str, PyTree]
  costs: np.ndarray                    # (E+1,) GMACs of each full route, exits then backbone
  exits: tuple[int, ...]               # block index of each exit, increasing

  @property
  def use_bank(self) -> bool:
    return bool(self.branches.use_bank)


# ------------------------------------------------------------------------------ helpers

def branches_subdir(use_bank: bool) -> str:
  """Checkpoint stage name of the branches ('branches' or the no-bank ablation)."""
  return 'branches' if use_bank else 'branches_nobank'


def bank_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'bank')


def _check_oasis(config) -> None:
  if config.backbone != 'oasis':
    raise PipelineError(f'config.backbone={config.backbone!r}: the FIANCEE pipeline module '
                        "assembles the 'oasis' backbone only")


def prefix_stop(config, use_bank: bool) -> int:
  """Last backbone block of the shared prefix: the first exit, and the key block if guided."""
  stop = min(config.branches.exits)
  return max(stop, config.bank.key_block) if use_bank else stop


def _onehot(generator: oasis.Generator, seg: jax.Array) -> jax.Array:
  return oasis.validate_inputs(seg, generator.num_classes, generator.height, generator.width)


def _prefix_impl(generator: oasis.Generator, gen_vars: PyTree, seg_onehot: jax.Array,
                 z: jax.Array, stop: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  def f(mdl, seg, zz):
    cond = mdl.make_cond(seg, zz)
    x = mdl.stem(cond)
    _, feats = mdl.run_blocks(x, cond, 0, stop, False)
    return cond, {'fc': x, **feats}
  return generator.apply(gen_vars, seg_onehot, z, method=f)


def _continue(generator: oasis.Generator, gen_vars: PyTree, feats: dict[str, jax.Array],
              cond: jax.Array, stop: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Backbone block `stop` output from the deepest block already in `feats`."""
  have = max(int(k[5:]) for k in feats if k.startswith('block'))
  if have >= stop:
    return feats[f'block{stop}'], {}
  return generator.apply(gen_vars, feats[f'block{have}'], cond, have, stop, False,
                         method='run_blocks')


# ------------------------------------------------------------------------------ API

def prefix(pipeline: Pipeline, params: dict, seg_onehot: jax.Array, z: jax.Array
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(cond, feats): stem + ResBlocks 1..prefix_stop, shared by every route (eval mode)."""
  stop = prefix_stop(pipeline.config, pipeline.use_bank)
  return _prefix_impl(pipeline.generator, params['generator'], seg_onehot, z, stop)


def bank_features(generator: oasis.Generator, gen_vars: PyTree, seg_onehot: jax.Array,
                  z: jax.Array, key_block: int = 1, value_block: int = 3
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Bank rows of a batch (Sec. 4.1): keys (B, h, w, Dk) = block-`key_block` map (grid
  H/32 x W/32 for block 1), values (B, H3, W3, Dv) = block-`value_block` map (glued; the
  bank builder cuts it on the key grid), classes (B, h, w) = majority label per grid cell."""
  seg_onehot = _onehot(generator, seg_onehot)
  _, feats = _prefix_impl(generator, gen_vars, seg_onehot, z, value_block)
  keys = feats[f'block{key_block}']
  classes = bank_lib.grid_classes(seg_onehot, keys.shape[1:3])
  return keys, feats[f'block{value_block}'], classes


def guide(pipeline: Pipeline, params: dict, feats: dict[str, jax.Array], seg_onehot: jax.Array,
          backend: str | None = None) -> jax.Array | None:
  """Glued value map (B, H3, W3, Dv) of the nearest same-class bank keys of the block-1 map
  (None when the branches are unguided). `backend` overrides config.bank.backend."""
  if not pipeline.use_bank:
    return None
  bank = params.get('bank')
  if bank is None:
    raise PipelineError('guided branches need params["bank"]: load the pipeline with the '
                        "'bank' stage (build_bank.py)")
  c = pipeline.config
  queries = feats[f'block{c.bank.key_block}']
  classes = bank_lib.grid_classes(seg_onehot, queries.shape[1:3])
  return bank_lib.retrieve(bank, queries, classes, backend=backend or c.bank.backend)


def _branch(pipeline: Pipeline, params: dict, k: int, x: jax.Array, cond: jax.Array,
            g: jax.Array | None) -> jax.Array:
  return pipeline.branches.apply(params['branches'], k, x, cond, g, False, method='exit')


def exit_image(pipeline: Pipeline, params: dict, k: int, seg_onehot: jax.Array, z: jax.Array,
               backend: str | None = None) -> jax.Array:
  """Image (B, H, W, 3) in [-1, 1] of the full route through exit k: prefix, backbone
  blocks up to k, guide, branch k."""
  if k not in pipeline.exits:
    raise PipelineError(f'exit {k}: this pipeline has exits {pipeline.exits}')
  seg_onehot = _onehot(pipeline.generator, seg_onehot)
  cond, feats = prefix(pipeline, params, seg_onehot, z)
  x, _ = _continue(pipeline.generator, params['generator'], feats, cond, k)
  g = guide(pipeline, params, feats, seg_onehot, backend)
  return _branch(pipeline, params, k, x, cond, g)


def backbone_image(pipeline: Pipeline, params: dict, seg_onehot: jax.Array, z: jax.Array
                   ) -> jax.Array:
  """The backbone's own image (the route without an early exit)."""
  img, _ = pipeline.generator.apply(params['generator'], seg_onehot, z, False)
  return img


def all_images(pipeline: Pipeline, params: dict, seg_onehot: jax.Array, z: jax.Array,
               backend: str | None = None) -> dict[Any, jax.Array]:
  """{k: image of exit k, ..., 'backbone': image} in one pass: the prefix, the guide and
  every backbone block are computed once."""
  g_mod, g_vars = pipeline.generator, params['generator']
  seg_onehot = _onehot(g_mod, seg_onehot)
  cond, feats = prefix(pipeline, params, seg_onehot, z)
  g = guide(pipeline, params, feats, seg_onehot, backend)
  out = {}
  for k in pipeline.exits:
    x, more = _continue(g_mod, g_vars, feats, cond, k)
    feats = {**feats, **more}
    out[k] = _branch(pipeline, params, k, x, cond, g)
  x, _ = _continue(g_mod, g_vars, feats, cond, oasis.NUM_BLOCKS)
  out['backbone'] = g_mod.apply(g_vars, x, method='head')
  return out


def route_fns(pipeline: Pipeline, backend: str | None = None
              ) -> list[Callable[[dict, jax.Array, jax.Array], jax.Array]]:
  """One jittable `fn(params, seg_onehot, z) -> image` per exit (in order), then the
  backbone's; each computes only its own route."""
  fns = [functools.partial(_route_exit, pipeline, k, backend) for k in pipeline.exits]
  return fns + [functools.partial(backbone_image, pipeline)]


def _route_exit(pipeline, k, backend, params, seg_onehot, z):
  return exit_image(pipeline, params, k, seg_onehot, z, backend)


# ------------------------------------------------------------------------------ assembly

def build_modules(config, use_bank: bool | None = None, axis_name: str | None = None
                  ) -> tuple[oasis.Generator, branches_lib.OASISBranches]:
  """(generator, branches) modules of an OASIS config (eval: axis_name None)."""
  _check_oasis(config)
  return (oasis.from_config(config, axis_name=axis_name),
          branches_lib.oasis_branches_from_config(config, axis_name=axis_name,
                                                  use_bank=use_bank))


def _abstract_inputs(config, batch: int = 1):
  d = config.data
  seg = jax.ShapeDtypeStruct((batch, d.height, d.width, d.num_classes), jnp.float32)
  z = jax.ShapeDtypeStruct((batch, config.model.z_dim), jnp.float32)
  return seg, z


def bank_shapes(config) -> dict[str, Any]:
  """Manifest fields a bank for this config must have (grid, key dim, value patch)."""
  d, b = config.data, config.bank
  specs = branches_lib.backbone_blocks(config)
  key, val = specs[b.key_block - 1], specs[b.value_block - 1]
  return {'grid': [key.height, key.width], 'key_dim': key.fout,
          'value_shape': [val.height // key.height, val.width // key.width, val.fout],
          'num_classes': d.num_classes}


def abstract_bank(config, num_keys: int | None = None) -> bank_lib.Bank:
  """A bank of the config's layout with abstract arrays (shapes only, for counting): with
  num_keys (default max_per_class x num_classes) rows. Its host part holds one dummy key
  per class so the FAISS backend traces (as a host callback: 0 device MACs)."""
  s = bank_shapes(config)
  nc, d = s['num_classes'], s['key_dim']
  n = num_keys or config.bank.max_per_class * nc
  host = bank_lib.BankHost(np.zeros((nc, d), np.float32), np.arange(nc, dtype=np.int32), nc)
  sds = jax.ShapeDtypeStruct
  return bank_lib.Bank(keys=sds((n, d), jnp.float32),
                       values=sds((n, *s['value_shape']), jnp.float32),
                       key_classes=sds((n,), jnp.int32), key_sqnorm=sds((n,), jnp.float32),
                       class_counts=sds((nc,), jnp.int32), class_offsets=sds((nc,), jnp.int32),
                       host=host)


def retrieval_macs(config) -> int:
  """Exact same-class L2 search of one image's queries (Sec. 3.3): grid cells x keys of the
  largest class (<= bank.max_per_class) x key dim (an upper bound; FAISS flat search)."""
  s = bank_shapes(config)
  return int(np.prod(s['grid']) * config.bank.max_per_class * s['key_dim'])


def _abstract_pipeline(config, use_bank: bool) -> tuple[Pipeline, dict]:
  gen, br = build_modules(config, use_bank=use_bank)
  seg, z = _abstract_inputs(config)
  g_vars = jax.eval_shape(lambda s, zz: gen.init({'params': jax.random.key(0)}, s, zz, False),
                          seg, z)
  b_vars = _branch_init_abstract(config, br, g_vars)
  bank = abstract_bank(config) if use_bank else None
  params = {'generator': g_vars, 'branches': b_vars, 'predictor': None, 'bank': bank}
  exits = tuple(sorted(config.branches.exits))
  p = Pipeline(config, gen, br, None, bank, params, np.zeros(len(exits) + 1), exits)
  return p, params


def _branch_init_abstract(config, br, g_vars) -> PyTree:
  return jax.eval_shape(functools.partial(init_branches, config, br), g_vars,
                        jax.random.key(0))


def init_branches(config, branches: branches_lib.OASISBranches, gen_vars: PyTree,
                  rng: jax.Array) -> PyTree:
  """Fresh branch variables, shaped by the backbone's block features (batch 1, zeros)."""
  gen = oasis.from_config(config)
  d = config.data
  seg = jax.nn.one_hot(jnp.zeros((1, d.height, d.width), jnp.int32), d.num_classes)
  z = jnp.zeros((1, config.model.z_dim), jnp.float32)
  stop = max(config.branches.exits)
  vb = config.bank.value_block
  _, feats = _prefix_impl(gen, gen_vars, seg, z, max(stop, vb))
  cond = gen.apply(gen_vars, seg, z, method='make_cond')
  g = feats[f'block{vb}'] if branches.use_bank else None

  def f(mdl):
    return {k: mdl.exit(k, feats[f'block{k}'], cond, g, False) for k in config.branches.exits}
  return branches.init({'params': rng}, method=f)


def route_costs(config, use_bank: bool, count_padded: bool = True) -> list[dict]:
  """GMACs and params of every route (exits in order, backbone last) of `config`, traced at
  its resolution with abstract arrays (make_jaxpr: nothing runs). Guided routes count the
  network only in 'gmacs' (retrieval is a host FAISS callback while tracing) and give the
  class-restricted L2 search bound in 'retrieval_gmacs'."""
  from fiancee_jax.metrics import flops  # noqa: PLC0415
  p, params = _abstract_pipeline(config, use_bank)
  seg, z = _abstract_inputs(config)
  gen_p = params['generator']['params']
  br_p = params['branches']['params']
  ret = retrieval_macs(config) / 1e9 if use_bank else 0.0
  rows = []
  for k, fn in zip(p.exits + ('backbone',), route_fns(p, backend='faiss')):
    macs = flops.count_macs(fn, params, seg, z, count_padded=count_padded)
    if k == 'backbone':
      n_params = flops.count_params(gen_p)
      row = {'route': 'backbone', 'exit': None, 'branch_params': 0}
    else:
      used = ['fc'] + [f'body_{i}' for i in range(k)]
      bp = flops.count_params(br_p[f'branches_branch_{k}'])
      n_params = flops.count_params([gen_p[u] for u in used]) + bp
      row = {'route': f'exit{k}', 'exit': k, 'branch_params': bp}
    row.update(gmacs=round(macs / 1e9, 3), macs=macs, params=n_params,
               retrieval_gmacs=round(ret, 3) if k != 'backbone' else 0.0)
    rows.append(row)
  return rows


def _sf_config(config, sf: float, use_bank: bool):
  c = ml_collections.ConfigDict(config.to_dict())
  c.branches.sf = sf
  c.branches.use_bank = use_bank
  return c


def exit_routes(config, scale_factors: Sequence[float] = SCALE_FACTORS) -> list[dict]:
  """Routes for the flops CLI: for each SF and bank on/off, every exit and the backbone as
  {route, sf, bank, gmacs, params, ...} (Table 1 = bank off; Table S8 = branch params)."""
  _check_oasis(config)
  sfs = list(scale_factors)
  if not any(abs(config.branches.sf - s) < 1e-9 for s in sfs):
    sfs.append(float(config.branches.sf))
  rows = []
  for sf in sfs:
    for use_bank in (False, True):
      for r in route_costs(_sf_config(config, sf, use_bank), use_bank):
        rows.append({'route': r['route'], 'sf': round(sf, 6), 'bank': use_bank, **r})
  return rows


def _flops_routes(config) -> list:
  """flops CLI registry hook: exit routes as flops.Route objects (one per SF x bank x exit)."""
  from fiancee_jax.metrics import flops  # noqa: PLC0415
  out = []
  sfs = list(SCALE_FACTORS)
  if not any(abs(config.branches.sf - s) < 1e-9 for s in sfs):
    sfs.append(float(config.branches.sf))
  for sf in sfs:
    for use_bank in (False, True):
      c = _sf_config(config, sf, use_bank)
      p, params = _abstract_pipeline(c, use_bank)
      seg, z = _abstract_inputs(c)
      gen_p = params['generator']['params']
      br_p = params['branches']['params']
      ret = round(retrieval_macs(c) / 1e9, 3) if use_bank else 0.0
      for k, fn in zip(p.exits, route_fns(p, backend='faiss')[:-1]):
        bp = flops.count_params(br_p[f'branches_branch_{k}'])
        used = [gen_p[u] for u in ['fc'] + [f'body_{i}' for i in range(k)]]
        out.append(flops.Route(f'exit{k}', fn, (params, seg, z), flops.count_params(used) + bp,
                               (c.data.height, c.data.width),
                               {'sf': round(sf, 6), 'bank': use_bank, 'exit': k,
                                'branch_params': bp, 'retrieval_gmacs': ret}))
  return out


def _register() -> None:
  try:
    from fiancee_jax.metrics import flops  # noqa: PLC0415
  except ImportError:  # pragma: no cover
    return
  flops.register_routes('oasis', _flops_routes)


# _register()


# ------------------------------------------------------------------------------ loading

def _stage_cmd(config, workdir: str, what: str) -> str:
  name = getattr(config, 'name', 'CONFIG')
  return f'{what} --config configs/{name}.py --workdir {workdir}'


def _load_backbone(config, workdir: str):
  """(EMA params, refreshed collections, meta) of the trained backbone. None saved yet: a
  PipelineError naming the command that trains it; one of another config or an unreadable
  one: checkpoint.load_backbone's CheckpointError, which says so (training it again in this
  workdir would not help)."""
  from fiancee_jax.train import checkpoint  # noqa: PLC0415
  d = checkpoint.checkpoint_dir(workdir, 'backbone')
  if not (os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))):
    raise PipelineError(f'no backbone checkpoint in {d}: run '
                        f'`{_stage_cmd(config, workdir, "python train.py")} --stage=backbone`')
  return checkpoint.load_backbone(workdir, config)


def load_pipeline(config, workdir: str, stages: Sequence[str] = STAGES,
                  use_bank: bool | None = None, verify_bank: bool = True) -> Pipeline:
  """Assemble the trained pipeline of `workdir` from the requested stages.

  backbone: EMA generator with refreshed BN stats (checkpoint.load_backbone); bank:
  `<workdir>/bank` checked against the backbone step and model hash; branches: latest
  `checkpoints/branches` (or `branches_nobank` when config.branches.use_bank is False);
  predictor: latest `checkpoints/predictor`. A missing stage raises PipelineError naming
  it and the command that makes it. Stages not requested stay None (bank / predictor) or
  freshly initialised (branches: zeros-free init, for shape use only). A head-avatar config
  is assembled by `fiancee_heads.load_pipeline`."""
  if config.backbone == 'megaportraits':
    from fiancee_jax import fiancee_heads  # noqa: PLC0415
    return fiancee_heads.load_pipeline(config, workdir, stages, use_bank,
                                       verify_bank=verify_bank)
  _check_oasis(config)
  unknown = sorted(set(stages) - set(STAGES))
  if unknown:
    raise PipelineError(f'load_pipeline stages {unknown}: expected some of {STAGES}')
  use_bank = config.branches.use_bank if use_bank is None else use_bank
  gen, br = build_modules(config, use_bank=use_bank)
  if 'backbone' not in stages:
    raise PipelineError("load_pipeline: the 'backbone' stage is always needed")
  g_params, g_coll, g_meta = _load_backbone(config, workdir)
  gen_vars = {'params': g_params, **g_coll}
  bank = None
  if 'bank' in stages and use_bank:
    bank = load_bank(config, workdir, backbone_step=g_meta.get('step'), verify=verify_bank)
  b_vars = None
  if 'branches' in stages:
    b_vars = load_branches(config, workdir, use_bank, gen_vars)
  else:
    b_vars = jax.jit(functools.partial(init_branches, config, br))(
        gen_vars, jax.random.PRNGKey(config.seed))
  predictor, p_vars = None, None
  if 'predictor' in stages:
    predictor, p_vars = load_predictor(config, workdir)
  params = {'generator': gen_vars, 'branches': b_vars, 'predictor': p_vars, 'bank': bank}
  costs = np.array([r['gmacs'] + r['retrieval_gmacs'] for r in route_costs(config, use_bank)])
  return Pipeline(config, gen, br, predictor, bank, params, costs,
                  tuple(sorted(config.branches.exits)))


def load_bank(config, workdir: str, backbone_step: int | None = None,
              verify: bool = True) -> bank_lib.Bank:
  """The bank of `workdir`, checked against this config (and the backbone step)."""
  path = bank_dir(workdir)
  if not os.path.isfile(os.path.join(path, 'manifest.json')):
    raise PipelineError(f'no bank in {path}: run '
                        f'`{_stage_cmd(config, workdir, "python build_bank.py")}`')
  expect = {'config_hash': cfg.config_hash(config), **bank_shapes(config)}
  if backbone_step is not None:
    expect['backbone_step'] = int(backbone_step)
  try:
    return bank_lib.load(path, expect=expect, verify=verify)
  except bank_lib.BankError as e:
    raise PipelineError(f'{e} (`{_stage_cmd(config, workdir, "python build_bank.py")} '
                        '--force`)') from e


def load_branches(config, workdir: str, use_bank: bool, gen_vars: PyTree) -> PyTree:
  """Branch variables of the latest branches checkpoint (trained with/without the bank)."""
  from fiancee_jax.train import checkpoint  # noqa: PLC0415
  stage = branches_subdir(use_bank)
  d = checkpoint.checkpoint_dir(workdir, stage)
  flag = '' if use_bank else ' --config.branches.use_bank=False'
  cmd = f'`{_stage_cmd(config, workdir, "python train.py")} --stage=branches{flag}`'
  if not os.path.isdir(d):
    raise PipelineError(f'no {stage} checkpoint in {d}: run {cmd}')
  ckpt = checkpoint.Checkpointer(workdir, stage, None, read_only=True)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise PipelineError(f'no {stage} checkpoint in {d}: run {cmd}')
    meta = ckpt.read_meta(step)
    if meta.get('model_hash') not in (None, cfg.config_hash(config)):
      raise PipelineError(f'{stage} checkpoint in {d} was trained for another model '
                          f'(model hash {meta.get("model_hash")}); rerun {cmd}')
    import orbax.checkpoint as ocp  # noqa: PLC0415
    out = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return out['state']['branches']
  except checkpoint.CheckpointError as e:
    raise PipelineError(f'{stage}: {e}; run {cmd}') from e
  finally:
    ckpt.close()


def load_predictor(config, workdir: str) -> tuple[nn.Module, PyTree]:
  """(predictor module, variables) of the latest predictor checkpoint. Contract with the
  predictor stage: its saved state holds the predictor variables under 'predictor'
  (or its params under 'params')."""
  from fiancee_jax.models import predictor as predictor_lib  # noqa: PLC0415
  from fiancee_jax.train import checkpoint  # noqa: PLC0415
  d = checkpoint.checkpoint_dir(workdir, 'predictor')
  cmd = f'`{_stage_cmd(config, workdir, "python train.py")} --stage=predictor`'
  if not os.path.isdir(d):
    raise PipelineError(f'no predictor checkpoint in {d}: run {cmd}')
  ckpt = checkpoint.Checkpointer(workdir, 'predictor', None, read_only=True)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise PipelineError(f'no predictor checkpoint in {d}: run {cmd}')
    import orbax.checkpoint as ocp  # noqa: PLC0415
    state = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))['state']
  finally:
    ckpt.close()
  if 'predictor' in state:
    variables = state['predictor']
  elif 'params' in state:
    variables = {'params': state['params']}
  else:
    raise PipelineError(f'predictor checkpoint in {d}: no "predictor" or "params" entry '
                        f'(keys {sorted(state)}); rerun {cmd}')
  return predictor_lib.from_config(config), variables


# ------------------------------------------------------------------------------ bank stage

NOISE_TAG = 0x5EED   # fold_in tag of the K fixed noises (shared with the predictor stage)


def fixed_noises(config, num: int | None = None) -> np.ndarray:
  """The K fixed noises (K, z_dim) of the bank (Sec. 4.1: 100 fixed 3D noises), drawn from
  config.seed; saved with the bank as `bank/noises.npy` so later stages reuse them."""
  k = config.bank.num_noises if num is None else num
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), NOISE_TAG)
  return np.asarray(jax.random.normal(key, (k, config.model.z_dim)), np.float32)


def _bank_meta(config, noises: np.ndarray, map_ids: np.ndarray) -> dict:
  return {'num_maps': int(config.bank.num_maps), 'num_noises': int(config.bank.num_noises),
          'max_per_class': int(config.bank.max_per_class), 'seed': int(config.seed),
          'noise_tag': NOISE_TAG, 'map_ids': [int(i) for i in map_ids],
          'noises': noises.tolist(), 'compute_batch': int(config.bank.compute_batch)}


def _write_noises(path: str, noises: np.ndarray) -> None:
  with io_utils.atomic_open(path) as f:
    np.save(f, noises)


def existing_bank_ok(config, workdir: str, backbone_step: int | None) -> str | None:
  """None if `<workdir>/bank` is a complete bank for this config and backbone step (manifest,
  checksums, noises.npy, same maps x noises); else the reason it is not."""
  path = bank_dir(workdir)
  if not os.path.isfile(os.path.join(path, 'manifest.json')):
    return 'no bank yet'
  try:
    bank = load_bank(config, workdir, backbone_step=backbone_step, verify=True)
  except PipelineError as e:
    return str(e)
  meta = bank.manifest.get('meta', {})
  for k in ('num_maps', 'num_noises', 'max_per_class', 'seed'):
    want = int(config.bank[k]) if k != 'seed' else int(config.seed)
    if meta.get(k) != want:
      return f'bank built with {k}={meta.get(k)}, config has {want}'
  noises_path = os.path.join(path, 'noises.npy')
  want = np.asarray(meta.get('noises'), np.float32)
  if not os.path.isfile(noises_path):
    _write_noises(noises_path, want)  # finish a build interrupted after the swap
  elif not np.array_equal(np.load(noises_path), want):
    return f'{noises_path} differs from the noises recorded in the manifest'
  return None


@functools.lru_cache(maxsize=4)
def _bank_feature_fn(generator: oasis.Generator, key_block: int, value_block: int):
  return jax.jit(lambda gv, seg, z: bank_features(generator, gv, seg, z, key_block,
                                                  value_block))


def build_bank(config, workdir: str, *, force: bool = False, batch_size: int = 16,
               progress: bool = True) -> dict:
  """The bank stage (Sec. 4.1, S1.1.1): M = bank.num_maps train label maps (random, fixed
  seed) x K = bank.num_noises fixed noises through the trained backbone; keys/values/classes
  streamed in batches into FPS (bank.max_per_class per class); saved to `<workdir>/bank`
  atomically with the manifest (backbone step + model hash) and `noises.npy`.
  An existing valid bank is kept (returns its manifest) unless `force`. A head-avatar config
  builds frame banks instead (`fiancee_heads.build_bank`: {identity: manifest})."""
  if config.backbone == 'megaportraits':
    from fiancee_jax import fiancee_heads  # noqa: PLC0415
    return fiancee_heads.build_bank(config, workdir, force=force, batch_size=batch_size,
                                    progress=progress)
  from fiancee_jax import data  # noqa: PLC0415 (heavy: tfds)
  _check_oasis(config)
  cfg.validate(config)
  if batch_size <= 0:
    raise PipelineError(f'batch_size={batch_size}: expected > 0')
  g_params, g_coll, g_meta = _load_backbone(config, workdir)
  step = g_meta.get('step')
  path = bank_dir(workdir)
  if not force:
    why = existing_bank_ok(config, workdir, step)
    if why is None:
      print(f'[bank] {path} is up to date (backbone step {step}); skipping — pass --force '
            'to rebuild', flush=True)
      return bank_lib.load(path, verify=False).manifest
    if why != 'no bank yet':
      print(f'[bank] rebuilding {path}: {why}', flush=True)
  b = config.bank
  src = data.source(config.data, 'train', cfg.data_dir(config, workdir))
  if b.num_maps > len(src):
    raise PipelineError(f'config.bank.num_maps={b.num_maps}: the train split has only '
                        f'{len(src)} label maps')
  rng = np.random.default_rng(config.seed)
  map_ids = np.sort(rng.choice(len(src), size=b.num_maps, replace=False))
  noises = fixed_noises(config)
  gen = oasis.from_config(config)
  gen_vars = {'params': g_params, **g_coll}
  fn = _bank_feature_fn(gen, b.key_block, b.value_block)
  nc = config.data.num_classes
  pairs = [(int(m), j) for m in map_ids for j in range(b.num_noises)]

  def read_batches():  # host reads of batch_size inputs; a label map is decoded once
    cache = {}
    for s in range(0, len(pairs), batch_size):
      chunk = pairs[s:s + batch_size]
      cache = {m: cache[m] if m in cache else np.asarray(src[m]['label'], np.int32)
               for m in dict.fromkeys(m for m, _ in chunk)}
      yield np.stack([cache[m] for m, _ in chunk]), noises[[j for _, j in chunk]]

  def feature_fn(chunk):  # one compiled shape (bank.compute_batch), padding dropped
    (labels, z), n = chunk
    seg = jax.nn.one_hot(labels, nc, dtype=jnp.float32)
    keys, values, classes = fn(gen_vars, seg, z)
    return (np.asarray(keys)[:n], np.asarray(values)[:n], np.asarray(classes)[:n])

  chunks = bank_lib.FixedChunks(read_batches(), b.compute_batch, num_inputs=len(pairs))
  manifest = bank_lib.build(feature_fn, chunks, path, max_per_class=b.max_per_class,
                            num_classes=nc, backbone_step=step,
                            config_hash=cfg.config_hash(config),
                            meta=_bank_meta(config, noises, map_ids), progress=progress)
  _write_noises(os.path.join(path, 'noises.npy'), noises)
  print(f'[bank] wrote {path}: {manifest["count"]} keys from {len(pairs)} inputs '
        f'({b.num_maps} maps x {b.num_noises} noises), backbone step {step}', flush=True)
  return manifest

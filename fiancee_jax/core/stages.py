"""Loading the trained stages of a workdir into a `Pipeline`, and the bank stage's driver.

Stages of one experiment, in the paper's order: backbone (train.py --stage=backbone) -> bank
(build_bank.py) -> branches (train.py --stage=branches, `branches_nobank` for the ablation) ->
predictor (train.py --stage=predictor). A missing stage raises `PipelineError` naming it and
the command that makes it.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp

from fiancee_jax import config as cfg
from fiancee_jax import workdir as wd
from fiancee_jax.core import bank as bank_lib
from fiancee_jax.core import predictor_model
from fiancee_jax.core.interface import Backbone
from fiancee_jax.core.pipeline import Pipeline, PipelineError, init_branches
from fiancee_jax.train import checkpoint

PyTree = Any
STAGES = ('backbone', 'bank', 'branches', 'predictor')


def _train_cmd(config, workdir: str) -> str:
  return wd.stage_cmd(config, workdir, 'python train.py')


def load_backbone(backbone: Backbone, workdir: str) -> tuple[PyTree, dict]:
  """(generator variables {'params', ...collections} = EMA weights with refreshed BN stats,
  checkpoint meta). None saved yet: a PipelineError naming the command that trains it; one
  of another config or an unreadable one: checkpoint.load_backbone's CheckpointError."""
  config = backbone.config
  d = wd.checkpoint_dir(workdir, 'backbone')
  if not (os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))):
    raise PipelineError(f'no backbone checkpoint in {d}: run '
                        f'`{_train_cmd(config, workdir)} --stage=backbone`')
  params, coll, meta = checkpoint.load_backbone(workdir, config)
  return {'params': params, **coll}, meta


def _restore_state(workdir: str, stage: str, cmd: str) -> tuple[dict, dict]:
  d = wd.checkpoint_dir(workdir, stage)
  if not os.path.isdir(d):
    raise PipelineError(f'no {stage} checkpoint in {d}: run {cmd}')
  ckpt = checkpoint.Checkpointer(workdir, stage, None, read_only=True)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise PipelineError(f'no {stage} checkpoint in {d}: run {cmd}')
    meta = ckpt.read_meta(step)
    out = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return out['state'], meta
  except checkpoint.CheckpointError as e:
    raise PipelineError(f'{stage}: {e}; run {cmd}') from e
  finally:
    ckpt.close()


def load_branches(backbone: Backbone, workdir: str, use_bank: bool) -> PyTree:
  """Branch variables of the latest branches checkpoint (trained with/without the bank)."""
  config = backbone.config
  stage = wd.branches_stage(use_bank)
  flag = '' if use_bank else ' --config.branches.use_bank=False'
  cmd = f'`{_train_cmd(config, workdir)} --stage=branches{flag}`'
  state, meta = _restore_state(workdir, stage, cmd)
  if meta.get('model_hash') not in (None, cfg.config_hash(config)):
    raise PipelineError(f'{stage} checkpoint in {wd.checkpoint_dir(workdir, stage)} was '
                        f'trained for another model (model hash {meta.get("model_hash")}); '
                        f'rerun {cmd}')
  return state['branches']


def load_predictor(backbone: Backbone, workdir: str) -> PyTree:
  """Predictor variables of the latest predictor checkpoint. Contract with the predictor
  stage: its saved state holds them under 'predictor' (or its params under 'params')."""
  cmd = f'`{_train_cmd(backbone.config, workdir)} --stage=predictor`'
  state, _ = _restore_state(workdir, 'predictor', cmd)
  if 'predictor' in state:
    return state['predictor']
  if 'params' in state:
    return {'params': state['params']}
  raise PipelineError(f'predictor checkpoint in {wd.checkpoint_dir(workdir, "predictor")}: no '
                      f'"predictor" or "params" entry (keys {sorted(state)}); rerun {cmd}')


def load_bank_at(config, workdir: str, path: str, shapes: dict, backbone_step: int | None,
                 verify: bool = True, what: str = 'bank') -> bank_lib.Bank:
  """The bank in `path` (one of `workdir`'s), checked against this config's model hash and
  the adapter's `shapes` (and the backbone step): a PipelineError naming build_bank.py when
  it is missing, another model's, stale or corrupt. Searched with the config's index
  (`bank.index`, `bank.faiss_threads`, ...: `bank.with_index`)."""
  cmd = wd.stage_cmd(config, workdir, 'python build_bank.py')
  if not os.path.isfile(os.path.join(path, 'manifest.json')):
    raise PipelineError(f'no {what} in {path}: run `{cmd}`')
  expect = {'config_hash': cfg.config_hash(config), **shapes}
  if backbone_step is not None:
    expect['backbone_step'] = int(backbone_step)
  try:
    bank = bank_lib.load(path, expect=expect, verify=verify)
  except bank_lib.BankError as e:
    raise PipelineError(f'{e} (`{cmd} --force`)') from e
  # the config's search index (bank.index 'flat' | 'ivf' | 'hnsw', bank.faiss_threads)
  return bank_lib.with_index(bank, config.bank)


def load_pipeline(backbone: Backbone, workdir: str, stages: Sequence[str] = STAGES,
                  use_bank: bool | None = None, verify_bank: bool = True,
                  **bank_select: Any) -> Pipeline:
  """Assemble the trained pipeline of `workdir` from the requested stages.

  backbone: EMA generator with refreshed BN stats; bank: `Backbone.load_bank` (checked against
  the backbone step and model hash; `bank_select`, e.g. identities=..., picks part of it);
  branches: latest `checkpoints/branches` (or `branches_nobank` when unguided); predictor:
  latest `checkpoints/predictor`. Stages not requested stay None (bank / predictor) or freshly
  initialised (branches, for shape use only)."""
  config = backbone.config
  unknown = sorted(set(stages) - set(STAGES))
  if unknown:
    raise PipelineError(f'load_pipeline stages {unknown}: expected some of {STAGES}')
  if 'backbone' not in stages:
    raise PipelineError("load_pipeline: the 'backbone' stage is always needed")
  use_bank = bool(config.branches.use_bank if use_bank is None else use_bank) and \
      backbone.has_bank
  gen, br = backbone.generator(), backbone.branches(use_bank=use_bank)
  gen_vars, g_meta = load_backbone(backbone, workdir)
  bank = None
  if 'bank' in stages and use_bank:
    bank = backbone.load_bank(workdir, g_meta.get('step'), verify_bank, **bank_select)
  if 'branches' in stages:
    b_vars = load_branches(backbone, workdir, use_bank)
  else:
    b_vars = jax.jit(functools.partial(init_branches, backbone, br))(
        jax.random.PRNGKey(config.seed))
  predictor, p_vars = None, None
  if 'predictor' in stages:
    predictor, p_vars = predictor_model.model(backbone), load_predictor(backbone, workdir)
  params = {'generator': gen_vars, 'branches': b_vars, 'predictor': p_vars, 'bank': bank}
  return Pipeline(backbone, gen, br, predictor, params, backbone.route_costs(use_bank),
                  backbone.exits)


def build_bank(backbone: Backbone, workdir: str, *, force: bool = False, batch_size: int = 16,
               progress: bool = True) -> Any:
  """The bank stage (build_bank.py) for the trained backbone of `workdir`; the adapter says
  what a bank is (OASIS: maps x fixed noises; heads: a frame bank per identity)."""
  config = backbone.config
  cfg.validate(config)
  if not backbone.has_bank:
    raise PipelineError(f'the {backbone.name} backbone has no guiding bank')
  if batch_size <= 0:
    raise PipelineError(f'batch_size={batch_size}: expected > 0')
  gen_vars, meta = load_backbone(backbone, workdir)
  return backbone.build_bank(workdir, gen_vars, meta.get('step'), force=force,
                             batch_size=batch_size, progress=progress)

"""Orbax checkpoints: the one checkpoint loader every stage uses.

Layout: `<workdir>/checkpoints/<stage>/<step>/{state, meta}` written by an orbax
`CheckpointManager` (atomic: orbax writes `<step>.orbax-checkpoint-tmp-<time>/` and renames it
to `<step>/` when complete; keep-last-K). A save killed part-way leaves only that temporary
folder: no reader sees it as a step (`latest_step` lists finished steps), and the next
writable `Checkpointer` of the stage removes it with one printed line, so a rerun resumes from
the last finished step.
'state' is the stage's train-state pytree (StandardSave), 'meta' a JSON dict:
  stage, step, config_hash (of the sections that fix the state's shapes), model_hash (of
  config.model + data shape: what a later stage checks), data (the loader's position),
  config (the full config, for people reading the folder), and stage-specific extras.
A checkpoint written for another config is refused with one clear error.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Sequence

import jax
import ml_collections
import orbax.checkpoint as ocp

from fiancee_jax import config as cfg
from fiancee_jax import workdir as wdir
from fiancee_jax.errors import FianceeError

PyTree = Any

# Config sections whose values fix each stage's state shapes (what its config_hash covers).
STAGE_HASH_SECTIONS = {
    'backbone': ('model', 'disc'),
    'branches': ('model', 'branches'),
    'branches_nobank': ('model', 'branches'),
    'predictor': ('model', 'branches', 'predictor'),
}


class CheckpointError(FianceeError):
  """A missing, corrupt or incompatible checkpoint."""


def finished_steps(workdir: str, stage: str) -> list[int]:
  """The finished checkpoint steps of `stage` in `workdir`, ascending (orbax's temporary
  folders of unfinished saves are not steps)."""
  d = wdir.checkpoint_dir(workdir, stage)
  names = os.listdir(d) if os.path.isdir(d) else []
  return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(d, n)))


def remove_unfinished(directory: str) -> list[str]:
  """Remove the temporary folders of saves that were killed before orbax finalised them
  (says so in one line); returns their names."""
  names = sorted(n for n in (os.listdir(directory) if os.path.isdir(directory) else [])
                 if ocp.path.step.TMP_DIR_SUFFIX in n)
  for n in names:
    shutil.rmtree(os.path.join(directory, n), ignore_errors=True)
  if names:
    print(f'[checkpoint] {directory}: removed {", ".join(names)} (a save killed before orbax '
          'finished it; never loaded)', flush=True)
  return names


def stage_hash(config: ml_collections.ConfigDict, stage: str) -> str:
  return cfg.config_hash(config, STAGE_HASH_SECTIONS.get(stage, ('model',)))


class Checkpointer:
  """Periodic saves + exact restore of one stage's state in `workdir`."""

  def __init__(self, workdir: str, stage: str, config: ml_collections.ConfigDict | None = None,
               *, keep: int = 3, read_only: bool = False):
    self.workdir, self.stage, self.config = workdir, stage, config
    self.directory = wdir.checkpoint_dir(workdir, stage)
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f'no {stage} checkpoint in {workdir}: {self.directory} does not '
                            'exist (run that stage first)')
    if not read_only:
      remove_unfinished(self.directory)
    # read_only: never creates or deletes (orbax's own read_only flag only logs warnings).
    options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep,
                                           create=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: PyTree, meta: dict[str, Any] | None = None) -> None:
    """Save `state` (host or replicated arrays) at `step` with the JSON metadata."""
    full = {'stage': self.stage, 'step': int(step)}
    if self.config is not None:
      full.update(config_hash=stage_hash(self.config, self.stage),
                  model_hash=cfg.config_hash(self.config), config=cfg.to_json(self.config))
    full.update(meta or {})
    self.manager.save(int(step), force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(full)))

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no {self.stage} checkpoint in {self.directory}')
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - any orbax failure is one clear message
      raise CheckpointError(f'cannot read the metadata of checkpoint {self.directory}/{step}: '
                            f'{type(e).__name__}: {e}') from e
    return dict(out['meta'])

  def restore_untyped(self, step: int) -> PyTree:
    """The saved state of `step` as stored (no target tree); any orbax failure is one
    CheckpointError naming the checkpoint."""
    try:
      return self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore()))['state']
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f'cannot read {self.stage} checkpoint {self.directory}/{step}: '
                            f'{type(e).__name__}: {e}') from e

  def check_config(self, meta: dict[str, Any], key: str = 'config_hash') -> None:
    """One clear error when the checkpoint was written for another config."""
    if self.config is None:
      return
    want = (stage_hash(self.config, self.stage) if key == 'config_hash'
            else cfg.config_hash(self.config))
    have = meta.get(key)
    if have != want:
      sections = (STAGE_HASH_SECTIONS.get(self.stage, ('model',)) if key == 'config_hash'
                  else ('model',))
      raise CheckpointError(
          f'checkpoint in {self.directory} was written for config hash {have}, this config is '
          f'{want} (config sections {", ".join(sections)} and the data shape differ); use the '
          'config it was trained with or another --workdir')

  def restore(self, target: PyTree, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
    """Restore (state shaped like `target`, meta) from `step` (default: latest)."""
    step = self.latest_step() if step is None else step
    meta = self.read_meta(step)
    self.check_config(meta)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f'cannot restore checkpoint {self.directory}/{step} into this '
                            f'{self.stage} state: {type(e).__name__}: {e}') from e
    return out['state'], meta

  def resume_gan(self, host_state: PyTree, name: str) -> tuple[PyTree, dict[str, Any] | None]:
    """(state, data-loader position) from the latest checkpoint of a backbone stage
    ({'train': GANState, 'ema_bn': refreshed EMA statistics}), or (host_state, None) when
    there is none yet (a fresh run)."""
    if self.latest_step() is None:
      return host_state, None
    saved, meta = self.restore({'train': host_state, 'ema_bn': host_state.ema_state_g})
    print(f'[{name}] resumed from {self.directory} at step {int(saved["train"].step)}',
          flush=True)
    return saved['train'], meta.get('data')

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def export(workdir: str, stage: str, dest_workdir: str, keep: Sequence[str]) -> str:
  """Copy the latest `stage` checkpoint of `workdir` into `dest_workdir` with only the entries
  `keep` of its state (e.g. the branch variables later stages load, without the optimiser
  and discriminator states): an artifact small enough to ship. The metadata is kept, with
  'exported' = keep; such a checkpoint feeds the later stages, and the branch stage
  continues from it with a fresh optimiser (`train.branches.continue_exported`; not an
  exact resume).
  Returns the written step's directory."""
  src = Checkpointer(workdir, stage, None, read_only=True)
  try:
    step = src.latest_step()
    if step is None:
      raise CheckpointError(f'no {stage} checkpoint in {src.directory}')
    meta = src.read_meta(step)
    state = src.restore_untyped(step)
  finally:
    src.close()
  missing = [k for k in keep if k not in state]
  if missing:
    raise CheckpointError(f'{src.directory}/{step}: no {missing} in its state '
                          f'(entries {sorted(state)})')
  dest = Checkpointer(dest_workdir, stage, None, keep=1)
  try:
    dest.save(step, {k: state[k] for k in keep}, {**meta, 'exported': list(keep)})
  finally:
    dest.close()
  return os.path.join(dest.directory, str(step))


def with_stage(workdir: str, stage: str, config: ml_collections.ConfigDict, keep: int,
               train: Callable[[Checkpointer], Any]) -> Any:
  """`train(ckpt)` with the stage's checkpointer open (closed after, saves finished). A
  checkpoint written for another config is refused first, before anything compiles."""
  ckpt = Checkpointer(workdir, stage, config, keep=keep)
  try:
    if ckpt.latest_step() is not None:
      ckpt.check_config(ckpt.read_meta())
    return train(ckpt)
  finally:
    ckpt.close()


def restore_latest(workdir: str, stage: str, target: PyTree,
                   config: ml_collections.ConfigDict | None = None
                   ) -> tuple[PyTree, dict[str, Any]] | None:
  """(state, meta) of the latest `stage` checkpoint in `workdir`, or None if there is none.
  With `config`, a checkpoint of another config raises CheckpointError."""
  if not os.path.isdir(wdir.checkpoint_dir(workdir, stage)):
    return None
  ckpt = Checkpointer(workdir, stage, config, read_only=True)
  try:
    if ckpt.latest_step() is None:
      return None
    return ckpt.restore(target)
  finally:
    ckpt.close()


def load_backbone(workdir: str, config: ml_collections.ConfigDict
                  ) -> tuple[PyTree, dict[str, PyTree], dict[str, Any]]:
  """EMA generator of the latest backbone checkpoint in `workdir`, for the later stages:
  (params, collections, meta) where collections = {'batch_stats', 'spectral'} with the
  batch-norm statistics refreshed at save time (OASIS evaluates EMA weights that way).
  Checks config.model + data shape against the checkpoint (one clear error if they differ).
  """
  ckpt = Checkpointer(workdir, 'backbone', config, read_only=True)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise CheckpointError(f'no backbone checkpoint in {ckpt.directory}: run '
                            '`train.py --stage=backbone` first')
    meta = ckpt.read_meta(step)
    ckpt.check_config(meta, key='model_hash')
    saved = ckpt.restore_untyped(step)  # {'train': GANState fields, 'ema_bn': refreshed stats}
    return saved['train']['ema_params_g'], dict(saved['ema_bn']), meta
  finally:
    ckpt.close()


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m fiancee_jax.train.checkpoint --workdir W --stage S --to DIR [--keep K ...]`:
  `export` (how `assets/` checkpoints are made)."""
  import argparse  # noqa: PLC0415
  ap = argparse.ArgumentParser(description=export.__doc__.split('\n')[0])
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--stage', required=True, help="e.g. 'branches' or 'branches_nobank'")
  ap.add_argument('--to', required=True, help='destination workdir (e.g. assets/<name>)')
  ap.add_argument('--keep', nargs='+', default=['branches'], help='state entries to keep')
  a = ap.parse_args(argv)
  print(export(a.workdir, a.stage, a.to, a.keep), flush=True)


if __name__ == '__main__':
  main()

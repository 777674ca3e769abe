"""Every path of an experiment's `--workdir`, in one place.

  <workdir>/checkpoints/<stage>/<step>   orbax checkpoints (backbone, branches[_nobank], predictor)
  <workdir>/bank/                        the guiding bank (OASIS) | bank/<identity>/ (head avatars)
  <workdir>/predictor/                   predictor datasets (dataset_<split>.npz)
  <workdir>/infer/                       images of single-input inference
  <workdir>/report/                      the sweep's report (report.md, summary.json, figures)
  <workdir>/xla_cache/                   persistent XLA compilation cache of every entry point
                                         (cli.compilation_cache)
  <workdir>/../data/                     prepared datasets, shared by the runs of one machine
                                         (config.data.data_dir overrides it)
"""
from __future__ import annotations

import os


def root(workdir: str) -> str:
  return os.path.abspath(workdir)


def checkpoint_dir(workdir: str, stage: str) -> str:
  return os.path.join(root(workdir), 'checkpoints', stage)


def bank_dir(workdir: str) -> str:
  return os.path.join(root(workdir), 'bank')


def identity_bank_dir(workdir: str, identity: int) -> str:
  """`<workdir>/bank/<identity>`: the frame bank of one source identity (head avatars)."""
  return os.path.join(bank_dir(workdir), str(int(identity)))


def predictor_dir(workdir: str) -> str:
  return os.path.join(root(workdir), 'predictor')


def infer_dir(workdir: str) -> str:
  return os.path.join(root(workdir), 'infer')


def report_dir(workdir: str) -> str:
  return os.path.join(root(workdir), 'report')


def xla_cache_dir(workdir: str) -> str:
  return os.path.join(root(workdir), 'xla_cache')


def data_dir(config, workdir: str) -> str:
  """Where the stages read prepared datasets: data.data_dir, else <workdir>/../data (so the
  runs of one machine share one prepared copy). The parent is taken from the path, so a
  workdir that does not exist yet is not created on the way to it."""
  return config.data.data_dir or os.path.join(os.path.dirname(root(workdir)), 'data')


def branches_stage(use_bank: bool) -> str:
  """Checkpoint stage name of the branches ('branches' or the no-bank ablation)."""
  return 'branches' if use_bank else 'branches_nobank'


def stage_cmd(config, workdir: str, what: str) -> str:
  """The command line a user runs to (re)make a stage, for error messages."""
  name = getattr(config, 'name', 'CONFIG')
  return f'{what} --config configs/{name}.py --workdir {workdir}'

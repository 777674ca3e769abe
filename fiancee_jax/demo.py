"""`make demo`: every stage of one experiment in order, reusing the finished ones.

  python -m fiancee_jax.demo --config configs/oasis_synthetic.py --workdir runs/demo

prepare data -> train.py --stage=backbone -> build_bank.py -> train.py --stage=branches ->
train.py --stage=predictor -> infer.py --sweep (report). A stage is skipped when its output
in --workdir is complete (a checkpoint at the configured step count, a bank manifest, a report
newer than the predictor). Training stages run as the same commands a user would type (their
console progress shows through); the sweep runs in this process. `--backbone_from DIR` starts
from a backbone checkpoint shipped in DIR (DIR/checkpoints/backbone, copied once). Ends by
printing the report's path and its headline numbers.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ('data', 'backbone', 'bank', 'branches', 'branches_nobank', 'predictor', 'report')
# What --backbone_from / --branches_from copy into a workdir lacking it: stage -> its path.
SHIPPED = {'backbone': ('checkpoints', 'backbone'), 'branches': ('checkpoints', 'branches'),
           'branches_nobank': ('checkpoints', 'branches_nobank')}


def _latest_step(workdir: str, stage: str) -> int | None:
  from fiancee_jax.train import checkpoint  # noqa: PLC0415
  steps = checkpoint.finished_steps(workdir, stage)
  return steps[-1] if steps else None


def stage_done(config: Any, workdir: str, stage: str) -> bool:
  """Whether `stage`'s output in `workdir` is complete for this config."""
  from fiancee_jax import workdir as wd  # noqa: PLC0415
  if stage == 'data':
    return False  # prepare() itself is idempotent and cheap when done
  if stage in ('backbone', 'branches', 'branches_nobank', 'predictor'):
    want = {'backbone': config.train.num_steps, 'branches': config.branches.num_steps,
            'branches_nobank': config.branches.num_steps,
            'predictor': config.predictor.num_steps}[stage]
    step = _latest_step(workdir, stage)
    return step is not None and step >= want
  if stage == 'bank':
    return os.path.exists(os.path.join(wd.bank_dir(workdir), 'manifest.json'))
  if stage == 'report':
    summary = os.path.join(wd.report_dir(workdir), 'summary.json')
    pred = wd.checkpoint_dir(workdir, 'predictor')
    return (os.path.exists(summary) and os.path.isdir(pred)
            and os.path.getmtime(summary) >= os.path.getmtime(pred)
            and os.path.exists(os.path.join(wd.predictor_dir(workdir), 'eval.json')))
  raise ValueError(f'stage {stage!r}: expected one of {STAGES}')


def _command(stage: str, config_arg: Sequence[str], workdir: str) -> list[str]:
  """The command a user would type; `--verbosity=-1` keeps absl's INFO lines (orbax, tfds)
  off the demo console (progress lines are prints)."""
  py = sys.executable
  if stage == 'bank':
    return [py, os.path.join(REPO, 'build_bank.py'), *config_arg, f'--workdir={workdir}',
            '--verbosity=-1']
  if stage == 'branches_nobank':   # the unguided ablation (Fig. 8)
    return [py, os.path.join(REPO, 'train.py'), *config_arg,
            '--config.branches.use_bank=False', f'--workdir={workdir}', '--stage=branches',
            '--verbosity=-1']
  return [py, os.path.join(REPO, 'train.py'), *config_arg, f'--workdir={workdir}',
          f'--stage={stage}', '--verbosity=-1']


def _copy_shipped(stage: str, shipped: dict[str, str], workdir: str) -> str | None:
  """Copy `stage`'s shipped output (`shipped[stage]` = a workdir holding it) into `workdir`
  when `workdir` has none of it yet; returns the source copied, or None."""
  src_root = shipped.get(stage)
  if not src_root or stage not in SHIPPED:
    return None
  dst = os.path.join(workdir, *SHIPPED[stage])
  if os.path.exists(dst) and os.listdir(dst):
    return None
  src = os.path.join(src_root, *SHIPPED[stage])
  if not os.path.isdir(src):
    raise FileNotFoundError(f'shipped {stage}: no {src} (expected the output of that stage '
                            f'under {src_root})')
  tmp = dst + '.copying'
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(src, tmp)
  if os.path.isdir(dst):
    os.rmdir(dst)                     # empty (checked above)
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  os.replace(tmp, dst)
  return src


def headline(summary: dict[str, Any]) -> str:
  s, b = summary, summary.get('best_mean_target')
  counts = s.get('exit_counts')
  line = (f'threshold {s["threshold"]:g} ({s.get("rule", "")}): mean LPIPS '
          f'{s["mean_lpips"]:.4f}, violation rate {s["violation_rate"]:.3f}, GMACs share '
          f'{s["gmacs_share"]:.3f} of the backbone, exit counts {counts} of {s.get("num_test")} '
          f'test inputs, wall-clock speed-up x{s["latency_speedup"]:.2f} (routed batched vs '
          f'backbone, {s["device"]}); paper rule: GMACs share '
          f'{s["paper_rule"]["gmacs_share"]:.3f}, violation rate '
          f'{s["paper_rule"]["violation_rate"]:.3f}')
  if s.get('headline') != 'operating_point':
    return line + ('' if s.get('meets_target', True) else
                   ' [no swept threshold reached mean LPIPS <= 0.1]')
  return line + (f'\n[demo] largest threshold with mean LPIPS <= 0.1: {b["threshold"]:g}, '
                 f'GMACs share {b["gmacs_share"]:.3f}, mean LPIPS {b["mean_lpips"]:.4f}, '
                 f'violation rate {b["violation_rate"]:.3f}')


def run(config: Any, workdir: str, config_arg: Sequence[str], *,
        backbone_from: str | None = None, branches_from: str | None = None,
        stages: Sequence[str] = STAGES) -> dict[str, Any]:
  """Run the missing stages; returns the report summary. `backbone_from`: a workdir whose
  backbone checkpoint is copied in; `branches_from`: one whose branches (guided and unguided;
  exported checkpoints) are copied in (shipped: `assets/`). The bank is rebuilt from the
  backbone (deterministic, ~1 min), then the predictor and the report run."""
  from fiancee_jax import data, registry  # noqa: PLC0415
  from fiancee_jax import workdir as wd  # noqa: PLC0415
  from fiancee_jax.infer import sweep  # noqa: PLC0415
  bb = registry.get(config)
  os.makedirs(workdir, exist_ok=True)
  t_all = time.perf_counter()
  summary = None
  shipped = {'backbone': backbone_from, 'branches': branches_from,
             'branches_nobank': branches_from}
  for i, stage in enumerate(stages):
    head = f'[demo {i + 1}/{len(stages)}] {stage}'
    if stage_done(config, workdir, stage):
      print(f'{head}: done already in {workdir}, reused', flush=True)
      continue
    t0 = time.perf_counter()
    src = _copy_shipped(stage, shipped, workdir)
    if src:
      print(f'{head}: copied the shipped {src}', flush=True)
      if stage_done(config, workdir, stage):
        continue
    print(f'{head}: running', flush=True)
    if stage == 'data':
      path = data.prepare(config.data, wd.data_dir(config, workdir))
      print(f'{head}: {path}', flush=True)
    elif stage == 'report':
      summary = sweep.sweep(bb, workdir)
    else:
      cmd = _command(stage, config_arg, workdir)
      print('  $ ' + ' '.join(cmd), flush=True)
      rc = subprocess.call(cmd, cwd=REPO)
      if rc != 0:
        raise SystemExit(f'{head} failed (exit code {rc}); fix it and rerun: finished stages '
                         'are reused')
    print(f'{head}: {time.perf_counter() - t0:.0f} s', flush=True)
  if summary is None:
    with open(os.path.join(wd.report_dir(workdir), 'summary.json')) as f:
      summary = json.load(f)
  print(f'[demo] all stages in {time.perf_counter() - t_all:.0f} s', flush=True)
  print(f'[demo] report: {summary["report"]}', flush=True)
  print(f'[demo] {headline(summary)}', flush=True)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f['verbosity'].present:  # as the stage commands: absl's INFO lines (orbax) stay off
    logging.set_verbosity(logging.WARNING)
  filename = config_flags.get_config_filename(f['config'])
  overrides = config_flags.get_override_values(f['config'])
  config_arg = [f'--config={filename}'] + [f'--config.{k}={v}' for k, v in overrides.items()]
  run(f.config, f.workdir, config_arg, backbone_from=f.backbone_from,
      branches_from=f.branches_from)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Where every stage writes.')
  flags.DEFINE_string('backbone_from', None, 'Workdir of a shipped backbone checkpoint.')
  flags.DEFINE_string('branches_from', None,
                      'Workdir of shipped branches (guided and unguided).')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)

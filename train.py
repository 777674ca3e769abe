"""Train one stage of an experiment: `--stage=backbone` (G + D), `branches`, `predictor`.

  python train.py --config configs/oasis_synthetic.py --workdir runs/demo --stage=backbone
  python train.py --config configs/oasis_synthetic.py:tiny --workdir /tmp/t --stage=backbone

Resumes from the latest checkpoint in --workdir; SIGTERM / Ctrl-C finish the current step,
save and exit. Multi-host: the same command on every host with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID set (nothing on a TPU VM, Slurm, Open MPI); on one machine
`python -m fiancee_jax.launch -n 2 -- train.py ...` (fiancee_jax/train/parallel.py).
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from fiancee_jax import cli
from fiancee_jax.errors import FianceeError

config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and samples go.')
flags.DEFINE_enum('stage', 'backbone', ['backbone', 'branches', 'predictor'], 'Stage to train.')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS

def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from fiancee_jax.train import parallel
  try:
    parallel.initialize()  # several processes: before any other JAX call
    from fiancee_jax import config as fconfig, data, registry
    from fiancee_jax import workdir as wd
    from fiancee_jax.train import branches, gan, predictor
    stage = {'backbone': gan, 'branches': branches, 'predictor': predictor}[FLAGS.stage]
    fconfig.validate(FLAGS.config)
    backbone = registry.get(FLAGS.config)
    # The data first (idempotent; every stage reads it; process 0 writes it): a missing or
    # incomplete download fails here, before the stage creates anything in the workdir.
    parallel.chief_first(lambda: data.prepare(
        FLAGS.config.data, wd.data_dir(FLAGS.config, FLAGS.workdir)), 'prepare')
    cli.compilation_cache(FLAGS.workdir, must_exist=False)  # before the stage's first compile
    stage.train_and_evaluate(backbone, FLAGS.workdir)
  except (FianceeError, FileNotFoundError) as e:  # bad input, missing weight files: one line
    sys.exit(f'train.py: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('train.py'))

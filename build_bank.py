"""Build the guiding bank of a trained backbone (FIANCEE Sec. 3.3 / 4.1, S1.2.1).

  python build_bank.py --config configs/oasis_synthetic.py --workdir runs/demo [--force]
  python build_bank.py --config configs/megaportraits_synthetic.py --workdir runs/heads

Reads the backbone checkpoint in --workdir. OASIS: writes <workdir>/bank (keys, values,
classes, FAISS indices, the K fixed noises, manifest). Head avatars: one frame bank per
identity of the data, <workdir>/bank/<identity> (fiancee_jax/backbones/megaportraits/frame_banks.py). An up-to-date
bank is kept unless --force.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from fiancee_jax import cli
from fiancee_jax.errors import FianceeError

config_flags.DEFINE_config_file('config', None, 'experiment config file', lock_config=True)
flags.DEFINE_string('workdir', None, 'experiment directory (holds the backbone checkpoint)')
flags.DEFINE_bool('force', False, 'rebuild even if a valid bank exists')
flags.DEFINE_integer('batch_size', 16, 'inputs per backbone batch (maps x noises | frames)')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from fiancee_jax.train import parallel
  try:
    cli.compilation_cache(FLAGS.workdir)  # before the first compile
    parallel.initialize()  # several processes: before any other JAX call
    parallel.one_process_only('build_bank.py')
    from fiancee_jax import registry
    from fiancee_jax.core import stages
    stages.build_bank(registry.get(FLAGS.config), FLAGS.workdir, force=FLAGS.force,
                      batch_size=FLAGS.batch_size)
  except FianceeError as e:  # bad input (config, workdir, checkpoint, bank, data): one line
    sys.exit(f'build_bank.py: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('build_bank.py'))

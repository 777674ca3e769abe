"""Inference with early exits: one input, or the threshold sweep that writes the report.

  python infer.py --config configs/oasis_synthetic.py --workdir runs/demo \
      --label path/to/labelIds.png --noise_seed 0 --threshold 0.1 [--verify] [--out out.png]
  python infer.py --config configs/oasis_synthetic.py --workdir runs/demo --index 3 --threshold 0.1
  python infer.py --config configs/oasis_synthetic.py --workdir runs/demo --sweep \
      [--thresholds 0.05,0.1,0.2]

Head avatars: a (source, driver) pair; the source identity picks the frame bank (a dataset
source brings its own, a source file needs --identity):
  python infer.py --config configs/megaportraits_synthetic.py --workdir runs/heads \
      --source src.png --identity 38 --driver drv.png --threshold 0.1 [--verify] [--out out.png]
  python infer.py --config configs/megaportraits_synthetic.py --workdir runs/heads \
      --source_index 0 --driver_index 5 --split test --threshold 0.1
  python infer.py --config configs/megaportraits_synthetic.py --workdir runs/heads --sweep

Routing rule (both modes): --rule=calibrated (default; conformal offset for --alpha, default
config.routing.alpha, from the calibration rows train.py --stage=predictor cached), --rule=ltt
[--delta 0.1] (Learn-then-Test: the bound holds with probability 1 - delta), --rule=paper
(offset 0); --offset X overrides the rule with a hand-set offset (not together with --rule).

One input prints a JSON line: chosen exit, rule and offset, predicted (and with --verify true)
LPIPS, GMACs, latency, time to first image (from process start; 'startup' splits it); the
image goes to --out (default <workdir>/infer/<name>_t<threshold>.png).
--sweep writes <workdir>/report/ (report.md, summary.json, figures).

Many inputs, batched and routed (streaming, resumable; a bad file is reported and skipped):
  python infer.py --config configs/oasis_synthetic.py --workdir runs/demo \
      --labels path/to/label_pngs/ --out runs/demo/batch [--threshold 0.1 | --budget 1.2]
  python infer.py --config configs/oasis_synthetic.py --workdir runs/demo --split test --out DIR
writes DIR/<name>.png, DIR/results.jsonl (one line per input) and DIR/summary.json.
--budget GMACS (batch and --sweep): exits chosen under a mean compute budget per input
(routing.budget_exits) instead of the threshold rule (not with --threshold, --rule, --offset).
Compiled programs are cached in <workdir>/xla_cache (a second run loads them).
"""
import json
import sys

from absl import app, flags
from ml_collections import config_flags

from fiancee_jax import cli
from fiancee_jax.errors import FianceeError

STARTED = cli.process_start_time()

config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Workdir holding the trained stages.')
flags.DEFINE_string('label', None, 'Label-id PNG (single channel, class ids).')
flags.DEFINE_integer('index', None, 'Use label map --index of the --split data split instead.')
flags.DEFINE_string('split', 'test', 'Data split for --index / --source_index / --driver_index.')
flags.DEFINE_string('source', None, 'Head avatars: source RGB image (needs --identity).')
flags.DEFINE_string('driver', None, 'Head avatars: driver RGB image.')
flags.DEFINE_integer('source_index', None, 'Head avatars: source = example N of --split.')
flags.DEFINE_integer('driver_index', None, 'Head avatars: driver = example N of --split.')
flags.DEFINE_integer('identity', None, 'Head avatars: identity whose frame bank guides a '
                     '--source file.')
flags.DEFINE_integer('noise_seed', 0, 'Seed of the noise z.')
flags.DEFINE_string('threshold', '0.1', 'LPIPS threshold, in (0, 1].')
flags.DEFINE_enum('rule', 'calibrated', ['calibrated', 'ltt', 'paper'],
                  'Routing rule: calibrated = conformal offset from the cached calibration rows '
                  '(expected violation rate <= --alpha); ltt = Learn-then-Test offset (violation '
                  'rate <= --alpha with probability >= 1 - --delta); paper = offset 0.')
flags.DEFINE_float('alpha', None, 'Allowed share of outputs whose true LPIPS exceeds the '
                   'threshold (default config.routing.alpha).')
flags.DEFINE_float('delta', 0.1, '--rule=ltt: probability that its bound fails.')
flags.DEFINE_float('offset', None, 'Override: this offset (added to the predictions) for '
                   'every threshold instead of a --rule (not with --rule).')
flags.DEFINE_bool('verify', False, 'Also compute the true LPIPS against the backbone image.')
flags.DEFINE_string('out', None, 'Output PNG path for one input; the output folder with '
                    '--labels / --split (batched).')
flags.DEFINE_string('labels', None, 'Batched: a folder of label-id PNGs (needs --out).')
flags.DEFINE_float('budget', None, 'Mean GMACs per input: exits by routing.budget_exits '
                   '(batched and --sweep) instead of the threshold rule.')
flags.DEFINE_integer('chunk', None, 'Batched: inputs per routed batch (default the largest '
                     'config.routing.bucket_sizes).')
flags.DEFINE_bool('warm', True, 'Compile the routed programs ahead of time at load '
                  '(batch 1, and the batched chunk shapes).')
flags.DEFINE_bool('sweep', False, 'Sweep thresholds over the test split and write the report.')
flags.DEFINE_list('thresholds', None, 'Thresholds for --sweep (default config.routing).')
flags.DEFINE_integer('repeats', 3, 'Timing repeats (median).')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from fiancee_jax.train import parallel
  try:
    cli.compilation_cache(FLAGS.workdir)  # before the first compile
    parallel.initialize()  # several processes: before any other JAX call
    from fiancee_jax import registry
    from fiancee_jax.infer import engine, inputs, report, rules, sweep
    batched = FLAGS.labels is not None or (FLAGS['split'].present and FLAGS.index is None
                                           and FLAGS.source_index is None
                                           and FLAGS.driver_index is None and not FLAGS.sweep)
    if batched:
      one = [f'--{n}' for n in ('label', 'index', 'source', 'driver', 'source_index',
                                'driver_index', 'identity', 'verify') if FLAGS[n].present]
      if one:
        raise inputs.InferError(f'--labels / --split (batched) and {", ".join(one)} (one '
                                'input): give one of them')
    if FLAGS.budget is not None:
      given = [f'--{n}' for n in ('threshold', 'rule', 'offset', 'alpha', 'delta', 'thresholds')
               if FLAGS[n].present]
      if given:
        raise inputs.InferError(f'--budget={FLAGS.budget:g} and {", ".join(given)}: give one; '
                                '--budget picks exits under a mean GMAC budget, the threshold '
                                'rule picks the cheapest exit meeting a threshold')
      if not batched and not FLAGS.sweep:
        raise inputs.InferError('--budget needs a batch (--labels DIR or --split S with --out, '
                                'or --sweep): a mean budget is over many inputs')
    rule = rules.check(FLAGS.rule if FLAGS['rule'].present else None, FLAGS.alpha,
                       FLAGS.delta, FLAGS.offset, float(FLAGS.config.routing.alpha))
    bb = registry.get(FLAGS.config)
    if FLAGS.sweep:
      if FLAGS.budget is not None:
        print(json.dumps(report.jsonable(sweep.budget_sweep(bb, FLAGS.workdir, FLAGS.budget))))
        return
      ts = None if FLAGS.thresholds is None else [inputs.check_threshold(t, 'thresholds')
                                                   for t in FLAGS.thresholds]
      summary = sweep.sweep(bb, FLAGS.workdir, thresholds=ts, repeats=FLAGS.repeats, rule=rule)
      print(json.dumps(report.jsonable(summary), default=str))
      return
    t = inputs.check_threshold(FLAGS.threshold)
    if batched:
      from fiancee_jax.infer import batch
      if FLAGS.out is None:
        raise inputs.InferError('--labels / --split (batched) need --out DIR: the folder of '
                                'the images, results.jsonl and summary.json')
      summary = batch.run(bb, FLAGS.workdir, FLAGS.out, labels=FLAGS.labels,
                          split=None if FLAGS.labels else FLAGS.split,
                          noise_seed=FLAGS.noise_seed, threshold=t, rule=rule,
                          budget=FLAGS.budget, chunk=FLAGS.chunk, started=STARTED,
                          warm=FLAGS.warm)
      print(json.dumps(report.jsonable(summary)))
      return
    info = engine.infer_file(bb, FLAGS.workdir, threshold=t, rule=rule, started=STARTED,
                             verify=FLAGS.verify, out=FLAGS.out, repeats=max(FLAGS.repeats, 1),
                             warm=FLAGS.warm,
                             label=FLAGS.label, index=FLAGS.index, split=FLAGS.split,
                             noise_seed=FLAGS.noise_seed, source=FLAGS.source,
                             driver=FLAGS.driver, source_index=FLAGS.source_index,
                             driver_index=FLAGS.driver_index, identity=FLAGS.identity)
    print(json.dumps(report.jsonable(info)))
  except (FianceeError, FileNotFoundError) as e:  # bad input, missing weight files: one line
    sys.exit(f'infer.py: {e}')

if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('infer.py'))

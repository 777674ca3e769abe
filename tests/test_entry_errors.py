"""Every bad input to the entry scripts is answered: one line `<script>: <input>: <expected>`,
a non-zero exit, nothing written or overwritten (issue 13, item 6).

One table (CASES) drives the test and the README's "Bad input" section. Most cases run the
script's own `main` in this process under absl flag parsing (as `app.run` does); the cases
marked `sub` run `python <script>.py` for real, to check the wiring (exit status 1, the message
as the last line of stderr, no traceback). Before and after each case every path under the
test's folder is snapshotted (type, size, mtime: the workdirs, the inputs, the --out path and
the data files of the shared data dir) and must be unchanged.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from PIL import Image

from fiancee_jax import cli
from tests.conftest import REPO
from tests.conftest import backbone_workdir

TINY = 'configs/oasis_synthetic.py:tiny'
LABEL = ('an 8-bit single-channel PNG of label ids (mode L, e.g. Cityscapes *_labelIds.png)')
INFER = ['--config', TINY, '--workdir', '{wd}', '--out', '{root}/out.png']


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  script: str       # infer | train | build_bank
  input: str        # what the README says the input is
  args: tuple       # argv after the script name; {root} {wd} {stale} {corrupt} {in} filled in
  expect: str       # regex the message (after '<script>.py: ') must match from its start
  sub: bool = False  # run as a real subprocess
  vary: str = ''     # regex of a part that varies between runs: '...' in the README


def _label(input, file, expect, sub=False):
  return Case(f'infer-{file}', 'infer', input, (*INFER, '--label', '{in}/' + file),
              rf"--label='[^']*/{re.escape(file)}': " + expect, sub)


def _on(script, input, workdir, extra, expect, **kw):
  """A train.py / build_bank.py case on the tiny config in one of the fixture's workdirs."""
  wd = f'{{{workdir}}}' if workdir in ('wd', 'stale', 'corrupt', 'broken') else workdir
  name = re.sub(r'^an?-', '', re.sub(r'\W+', '-', input).strip('-'))
  return Case(f'{script}-{name}', script, input, ('--config', TINY, '--workdir', wd, *extra),
              expect, **kw)


EXPECT_LABEL = re.escape(LABEL)
OTHER_CONFIG = (r'checkpoint in [^ ]*/wd/checkpoints/backbone was written for config hash \w+, '
                r'this config is \w+ .*; use the config it was trained with or another '
                r'--workdir$')
STALE_BANK = (r'bank at [^ ]*/stale/bank was built for backbone_step=1; this model has '
              r'backbone_step=2\b.*build_bank\.py --config .* --force')
CORRUPT_META = r'cannot read the metadata of checkpoint [^ ]*/corrupt/checkpoints/backbone/1: '
TRUNCATED = r'cannot read backbone checkpoint [^ ]*/broken/checkpoints/backbone/1: '
NO_MANUAL_DIR = (r"cityscapes: manual_dir='[^']*/nowhere' is not a directory; expected "
                 r'<manual_dir>/leftImg8bit/\{train,val\}/<city>/\*_leftImg8bit\.png and '
                 r'<manual_dir>/gtFine/')
CASES = [
    # infer.py: the label map (read before any stage is loaded)
    _label('truncated PNG', 'truncated.png', r'cannot decode this PNG file \(image file is '
           r'truncated\); expected ' + EXPECT_LABEL + '$', sub=True),
    _label('RGB label map (colour-coded)', 'colour.png', r'colour image \(mode RGB, channels '
           r'differ: a colour-coded map\?\); expected ' + EXPECT_LABEL + '$'),
    _label('16-bit PNG', 'ids16.png', r'16-bit PNG \(mode I;16\); expected ' + EXPECT_LABEL
           + r" \(Cityscapes' 16-bit \*_instanceIds\.png hold instance ids, not label ids\)$"),
    _label('palette PNG', 'palette.png', r'palette PNG \(mode P\): its pixels are palette '
           r'indices, not necessarily class ids; expected ' + EXPECT_LABEL
           + r' \(if the indices are the ids, re-save as mode L: '),
    _label('label map of another size', 'small.png',
           r'size 32x48 \(HxW\); the model expects 64x64$'),
    _label('JPEG', 'ids.jpg', r'a JPEG file \(JPEG compression changes the ids along region '
           r'borders\); expected ' + EXPECT_LABEL + '$'),
    _label('empty file', 'empty.png', r'empty file \(0 bytes\); expected ' + EXPECT_LABEL + '$'),
    _label('directory', 'folder', r'a directory; expected ' + EXPECT_LABEL + '$'),
    _label('missing path', 'missing.png', r'no such file; expected ' + EXPECT_LABEL + '$'),
    # infer.py: the threshold
    *[Case(f'infer-threshold-{t}', 'infer', f'--threshold={t}',
           (*INFER, '--label', '{in}/ok.png', f'--threshold={t}'),
           re.escape(f"--threshold='{t}': ") + why + r' \(e\.g\. 0\.1\)$')
      for t, why in [('nan', r'expected a finite LPIPS value in \(0, 1\]'),
                     ('-1', r'expected a finite LPIPS value in \(0, 1\]'),
                     ('0', r'expected a finite LPIPS value in \(0, 1\]'),
                     ('abc', r'not a number; expected an LPIPS value in \(0, 1\]'),
                     ('1e9', r'expected a finite LPIPS value in \(0, 1\]')]],
    # infer.py: the routing rule (checked before any stage is loaded)
    *[Case(f'infer-rule-{name}', 'infer', ' '.join(extra),
           (*INFER, '--label', '{in}/ok.png', *extra), expect)
      for name, extra, expect in [
          ('and-offset', ('--rule=paper', '--offset=0.1'),
           r"--offset=0\.1 and --rule='paper': give one; --offset sets the offset by hand, "
           r'--rule computes it from the calibration rows$'),
          ('alpha', ('--alpha=1.5',), r'--alpha=1\.5: expected the allowed share of '
           r'violations, strictly in \(0, 1\) \(e\.g\. 0\.1\)$'),
          ('delta', ('--rule=ltt', '--delta=0'), r'--delta=0\.0: expected the probability '
           r'that the --rule=ltt bound fails, strictly in \(0, 1\) \(e\.g\. 0\.1\)$'),
          ('unknown', ('--rule=bonferroni',), r'flag --rule=bonferroni: value should be one '
           r'of <calibrated\|ltt\|paper> \(--helpfull lists the flags\)$')]],
    # the workdir
    _on('train', 'a workdir of another config', 'wd', ['--config.model.spade_hidden=16'],
        OTHER_CONFIG),
    _on('build_bank', 'a workdir of another config', 'wd', ['--config.model.spade_hidden=16'],
        OTHER_CONFIG, sub=True),
    _on('train', 'a corrupt checkpoint file (meta JSON cut short)', 'corrupt', [], CORRUPT_META),
    _on('build_bank', 'a corrupt checkpoint file (meta JSON cut short)', 'corrupt', ['--force'],
        CORRUPT_META),
    _on('build_bank', 'a corrupt checkpoint file (array data cut in half)', 'broken',
        ['--force'], TRUNCATED, vary=r'(?<=Error reading ).*'),
    Case('infer-corrupt-checkpoint', 'infer', 'a corrupt checkpoint file (array data cut in half)',
         (*INFER[:3], '{broken}', *INFER[4:], '--label', '{in}/ok.png'), TRUNCATED,
         vary=r'(?<=Error reading ).*'),
    _on('train', 'a bank of another backbone step', 'stale', ['--stage=branches'], STALE_BANK),
    Case('infer-stale-bank', 'infer', 'a bank of another backbone step',
         (*INFER[:3], '{stale}', *INFER[4:], '--label', '{in}/ok.png'), STALE_BANK),
    # the config
    _on('train', 'an unknown config key', 'wd', ['--config.train.no_such_key=1'],
        r"--config\.train\.no_such_key=1: unknown config key 'train\.no_such_key' \(config\."
        r"train has no 'no_such_key'\); expected one of config\.train: .*batch_size.*num_steps",
        sub=True),
    _on('build_bank', 'a misspelt config key', 'wd', ['--config.bank.max_per_clas=9'],
        r"--config\.bank\.max_per_clas=9: unknown config key 'bank\.max_per_clas' \(config\."
        r"bank has no 'max_per_clas'\); did you mean config\.bank\.max_per_class\? expected one "
        r'of config\.bank: '),
    _on('train', 'a config value of the wrong type', 'wd', ['--config.train.num_steps=abc'],
        r"flag --config\.train\.num_steps=abc: invalid literal for int\(\) with base 10: 'abc' "
        r'\(--helpfull lists the flags\)$'),
    Case('train-missing-config-file', 'train', 'a missing config file',
         ('--config', 'configs/nope.py', '--workdir', '{wd}'),
         r"--config='configs/nope\.py': no such config file; expected a Python file with "
         r'get_config\(\), e\.g\. configs/oasis_synthetic\.py\[:tiny\]$'),
    Case('build_bank-unknown-config-arg', 'build_bank', 'an unknown config argument',
         ('--config', 'configs/oasis_synthetic.py:bogus', '--workdir', '{wd}'),
         r'flag --config=configs/oasis_synthetic\.py:bogus: Error whilst parsing config file: '
         r"ValueError: oasis_synthetic: unknown arg 'bogus'; expected 'tiny' or none "
         r'\(--helpfull lists the flags\)$'),
    # the data
    Case('train-missing-manual-dir', 'train', 'a missing manual dataset dir (cityscapes)',
         ('--config', 'configs/oasis_cityscapes.py:tiny', '--workdir', '{root}/cs',
          '--config.data.manual_dir={root}/nowhere'), NO_MANUAL_DIR),
    _on('build_bank', 'a missing manual dataset dir (cityscapes data for a trained backbone)',
        'wd', ['--config.data.name=cityscapes', '--config.data.manual_dir={root}/nowhere',
               '--force'], NO_MANUAL_DIR),
]
assert len({c.id for c in CASES}) == len(CASES)


# ---------------------------------------------------------------------------------------------
# Set-up: a tiny workdir (random backbone at step 1 + its bank) and its bad variants.


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  from fiancee_jax import data, registry
  from fiancee_jax.core import stages
  from fiancee_jax.train import checkpoint
  c, shared_wd, state = backbone_workdir(tmp_path_factory)
  root = tmp_path_factory.mktemp('entry_errors')
  wd = str(root / 'wd')
  shutil.copytree(os.path.join(shared_wd, 'checkpoints'), os.path.join(wd, 'checkpoints'))
  c = c.copy_and_resolve_references()
  c.data.data_dir = str(root / 'data')          # = <workdir>/../data, what the scripts read
  data.prepare(c.data, c.data.data_dir)
  stages.build_bank(registry.get(c), wd, progress=False)   # bank of backbone step 1
  stale = str(root / 'stale')                   # backbone trained on to step 2, bank of step 1
  shutil.copytree(wd, stale)
  ck = checkpoint.Checkpointer(stale, 'backbone', c)
  ck.save(2, {'train': state, 'ema_bn': state.ema_state_g})
  ck.close()
  corrupt = str(root / 'corrupt')               # the checkpoint's meta JSON overwritten
  shutil.copytree(wd, corrupt)
  with open(os.path.join(corrupt, 'checkpoints', 'backbone', '1', 'meta', 'metadata'), 'w') as f:
    f.write('{"stage": "backbone", "step": 1, "config_ha')
  broken = str(root / 'broken')                 # the largest array data file cut in half
  shutil.copytree(wd, broken)
  state_files = [os.path.join(b, f) for b, _, fs in
                 os.walk(os.path.join(broken, 'checkpoints', 'backbone', '1', 'state')) for f in fs]
  big = max(state_files, key=os.path.getsize)
  with open(big, 'r+b') as f:
    f.truncate(os.path.getsize(big) // 2)
  _write_inputs(root / 'in', c.data.height, c.data.width)
  return {'root': str(root), 'wd': wd, 'stale': stale, 'corrupt': corrupt, 'broken': broken,
          'in': str(root / 'in')}


def _write_inputs(d, h, w):
  d.mkdir()
  ids = np.zeros((h, w), np.uint8)
  ids[8:24, 8:40] = 7
  Image.fromarray(ids).save(d / 'ok.png')
  data = (d / 'ok.png').read_bytes()
  (d / 'truncated.png').write_bytes(data[:len(data) // 2])
  colour = np.zeros((h, w, 3), np.uint8)
  colour[ids == 7] = (128, 64, 128)             # Cityscapes' colour of 'road'
  Image.fromarray(colour).save(d / 'colour.png')
  Image.fromarray(ids.astype(np.uint16) * 1000).save(d / 'ids16.png')   # instanceIds-like
  Image.fromarray(ids).convert('P').save(d / 'palette.png')
  Image.fromarray(np.zeros((32, 48), np.uint8)).save(d / 'small.png')
  Image.fromarray(ids).save(d / 'ids.jpg')
  (d / 'empty.png').write_bytes(b'')
  (d / 'folder').mkdir()


def test_inputs_are_what_they_say(dirs):
  """The bad files are really of the kind the table names."""
  d = dirs['in']
  modes = {f: (Image.open(os.path.join(d, f)).format, Image.open(os.path.join(d, f)).mode)
           for f in ('ok.png', 'truncated.png', 'colour.png', 'ids16.png', 'palette.png',
                     'ids.jpg')}
  assert modes == {'ok.png': ('PNG', 'L'), 'truncated.png': ('PNG', 'L'),
                   'colour.png': ('PNG', 'RGB'), 'ids16.png': ('PNG', 'I;16'),
                   'palette.png': ('PNG', 'P'), 'ids.jpg': ('JPEG', 'L')}


# ---------------------------------------------------------------------------------------------
# Running a script.


def snapshot(root: str) -> dict[str, tuple]:
  """{path: (kind, size, mtime_ns)} of everything under root, except that in the shared data
  dir (<root>/data) only data files count: not folders nor `.prepare.lock` files, the
  bookkeeping data.prepare leaves for a dataset it was asked for. The workdirs, the inputs and
  the --out path are compared whole."""
  out = {}
  data = os.path.join(root, 'data')
  for base, subdirs, files in os.walk(root):
    in_data = base == data or base.startswith(data + os.sep)
    for name in subdirs + files:
      p = os.path.join(base, name)
      is_dir = name in subdirs
      if in_data and (is_dir or name == '.prepare.lock') or p == data:
        continue
      st = os.lstat(p)
      out[os.path.relpath(p, root)] = ('dir' if is_dir else 'file',
                                       0 if is_dir else st.st_size, st.st_mtime_ns)
  return out


# The flags an entry script defined (its module body), forgotten before the next script runs.
# Only those and the --config.* overrides: modules the scripts import on the way (array_record,
# ...) define flags of their own, which later tests of this worker still read.
_SCRIPT_FLAGS: set[str] = set()


@pytest.fixture(scope='module', autouse=True)
def _absl_flags():
  """Leave absl's FLAGS as this module found them (but for flags of modules imported since)."""
  was_parsed = flags.FLAGS.is_parsed()
  yield
  _forget_script_flags()
  if not was_parsed:
    flags.FLAGS.unparse_flags()


def _forget_script_flags() -> None:
  for name in _SCRIPT_FLAGS | {n for n in flags.FLAGS if n.startswith('config.')}:
    if name in flags.FLAGS:
      delattr(flags.FLAGS, name)
  _SCRIPT_FLAGS.clear()


def _in_process(script: str, argv: list[str]) -> object:
  """`python <script>.py argv` in this process: the script's flags defined afresh (no other
  script's), absl parsing as app.run does it (`cli.flags_parser`), main; returns the exit
  code (the message when it exited with one)."""
  _forget_script_flags()
  spec = importlib.util.spec_from_file_location(f'_entry_{script}', REPO / f'{script}.py')
  module = importlib.util.module_from_spec(spec)
  before = set(flags.FLAGS)
  spec.loader.exec_module(module)
  _SCRIPT_FLAGS.update(set(flags.FLAGS) - before)
  old, sys.argv = sys.argv, argv  # ml_collections reads the --config.* overrides from sys.argv
  try:
    module.main(cli.flags_parser(f'{script}.py')(argv))
  except SystemExit as e:
    return e.code
  finally:
    sys.argv = old
  return 0


def answer(case: Case, dirs: dict[str, str]) -> str:
  """The case's one-line message (asserting exit status, one line, nothing written)."""
  args = [a.format(**dirs) for a in case.args]
  before = snapshot(dirs['root'])
  if case.sub:
    r = subprocess.run([sys.executable, f'{case.script}.py', *args], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]
    message = r.stderr.rstrip('\n').rsplit('\n', 1)[-1]
  else:
    message = _in_process(case.script, [f'{case.script}.py', *args])
    assert isinstance(message, str), f'{case.id}: exit code {message!r}, expected a message'
  after = snapshot(dirs['root'])
  changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
  assert not changed, f'{case.id}: written or overwritten: {changed}'
  assert '\n' not in message
  prefix = f'{case.script}.py: '
  assert message.startswith(prefix), message
  return message[len(prefix):]


_ANSWERS: dict[str, str] = {}


@pytest.mark.parametrize('case', CASES, ids=[c.id for c in CASES])
def test_bad_input_is_answered(case, dirs):
  message = answer(case, dirs)
  _ANSWERS[case.id] = message
  assert re.match(case.expect, message), f'{case.id}: {message}'


# ---------------------------------------------------------------------------------------------
# The README shows the real messages.

README_START = '<!-- bad-input table: tests/test_entry_errors.py -->'
README_END = '<!-- end of bad-input table -->'


def readme_table(answers: dict[str, str], dirs: dict[str, str]) -> str:
  def clean(m, vary):
    m = re.sub(vary, '...', m) if vary else m
    m = m.replace(dirs['root'], '<tmp>')
    m = re.sub(r'\b[0-9a-f]{16}\b', '<hash>', m)
    return m.replace('|', '\\|')
  rows = ['| script | input | what it prints (stderr, exit status 1) |', '|---|---|---|']
  for c in CASES:
    line = clean(f'{c.script}.py: {answers[c.id]}', c.vary)
    rows.append(f'| `{c.script}.py` | {c.input} | `` {line} `` |')
  return '\n'.join(rows)


def test_readme_shows_the_real_messages(dirs):
  answers = {c.id: _ANSWERS.get(c.id) or answer(c, dirs) for c in CASES}
  table = readme_table(answers, dirs)
  readme = (REPO / 'README.md').read_text()
  if os.environ.get('FIANCEE_WRITE_README'):  # regenerate: FIANCEE_WRITE_README=1 pytest ...
    head, rest = readme.split(README_START, 1)
    readme = f'{head}{README_START}\n{table}\n{README_END}{rest.split(README_END, 1)[1]}'
    (REPO / 'README.md').write_text(readme)
  section = readme.split(README_START, 1)[1].split(README_END, 1)[0].strip()
  assert section == table, 'README "Bad input" table is stale; rerun with FIANCEE_WRITE_README=1'


"""Batched routed inference over a folder (`infer.py --labels DIR --out DIR`,
fiancee_jax/infer/batch.py) on the tiny OASIS config: the shared random backbone, unguided
random branches and a random predictor saved as their stages save them (routing needs
trained-or-not stages, not good ones). One line per input, a corrupt file reported and
skipped, a rerun skips what is done, `--budget` keeps the mean GMACs within the budget and
excludes the threshold rule."""
import copy
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fiancee_jax import registry
from fiancee_jax import workdir as wdir
from fiancee_jax.core import pipeline as pl
from fiancee_jax.core import routing
from fiancee_jax.infer import batch, rules
from fiancee_jax.infer import engine as engine_lib
from fiancee_jax.infer.inputs import InferError
from fiancee_jax.train import checkpoint
from fiancee_jax.train import predictor as tp
from tests.conftest import REPO, backbone_workdir

N_GOOD = 5


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  c0, wd0, _ = backbone_workdir(tmp_path_factory)
  c = copy.deepcopy(c0)
  c.branches.use_bank = False
  root = tmp_path_factory.mktemp('batch_cli')
  wd = str(root / 'wd')
  shutil.copytree(wdir.checkpoint_dir(wd0, 'backbone'), wdir.checkpoint_dir(wd, 'backbone'))
  bb = registry.get(c)
  ck = checkpoint.Checkpointer(wd, wdir.branches_stage(False), c)
  ck.save(0, {'branches': pl.init_branches(bb, bb.branches(), jax.random.key(1))})
  ck.close()
  ck = checkpoint.Checkpointer(wd, 'predictor', c)
  ck.save(0, tp.create_state(bb, tp.input_shape(bb)))
  ck.close()
  labels = root / 'labels'
  labels.mkdir()
  rng = np.random.default_rng(0)
  d = c.data
  for i in range(N_GOOD):
    ids = rng.integers(0, d.num_classes, (d.height // 8, d.width // 8), dtype=np.uint8)
    Image.fromarray(np.kron(ids, np.ones((8, 8), np.uint8))).save(labels / f'map{i}.png')
  (labels / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not a png at all')
  eng = engine_lib.Engine(engine_lib.load(bb, wd))
  return {'c': c, 'bb': bb, 'wd': wd, 'labels': str(labels), 'root': root, 'eng': eng}


def _lines(out):
  with open(os.path.join(out, batch.RESULTS)) as f:
    return [json.loads(line) for line in f]


def test_folder_one_line_each_bad_file_skipped_resumed(setup, capsys):
  s = setup
  out = str(s['root'] / 'out')
  kw = dict(labels=s['labels'], threshold=0.3, rule=rules.check('paper'), chunk=2,
            engine=s['eng'], warm=False)
  summary = batch.run(s['bb'], s['wd'], out, **kw)
  lines = _lines(out)
  assert len(lines) == N_GOOD + 1
  bad = [r for r in lines if r['status'] == 'error']
  assert [r['input'] for r in bad] == ['broken.png'] and 'broken.png' in bad[0]['error']
  assert 'skipped broken.png' in capsys.readouterr().out
  ok = {r['name']: r for r in lines if r['status'] == 'ok'}
  assert sorted(ok) == [f'map{i}_s0' for i in range(N_GOOD)]
  assert summary['num_ok'] == N_GOOD and summary['num_errors'] == 1
  assert sum(summary['exit_counts'].values()) == N_GOOD
  eng, params = s['eng'], s['eng'].params
  for i in (0, N_GOOD - 1):   # the written image and line are that input's own route
    r = ok[f'map{i}_s0']
    req = s['bb'].infer_inputs().from_flags(s['wd'], {'label': os.path.join(s['labels'],
                                                                            f'map{i}.png')})
    pred = np.asarray(eng.predict(params, *map(jnp.asarray, req.inputs)))[0]
    route = int(routing.choose_exit(pred, 0.3, eng.costs))
    assert r['route'] == route and r['gmacs'] == pytest.approx(eng.costs[route])
    np.testing.assert_allclose(list(r['pred_lpips'].values()), pred, atol=1e-4)
    want = np.asarray(eng.routes[route](params, *map(jnp.asarray, req.inputs)))[0]
    img = np.asarray(Image.open(r['image']), np.float32) / 127.5 - 1
    assert np.abs(img - want).max() <= 1.5 / 127.5   # uint8 rounding
  with open(os.path.join(out, batch.SUMMARY)) as f:
    assert json.load(f)['num_ok'] == N_GOOD
  # A kill mid-line: the partial line is dropped; a rerun routes nothing already done and
  # tries the bad file again.
  with open(os.path.join(out, batch.RESULTS), 'ab') as f:
    f.write(b'{"name": "map9_s0", "sta')
  again = batch.run(s['bb'], s['wd'], out, **kw)
  assert again['this_run']['routed'] == 0 and again['this_run']['skipped_already_done'] == N_GOOD
  assert again['this_run']['errors'] == 1
  lines = _lines(out)
  assert len(lines) == N_GOOD + 2 and again['num_ok'] == N_GOOD and again['num_errors'] == 1


def test_budget_mode_and_flags(setup):
  s = setup
  costs = s['eng'].costs
  budget = float(costs[0] + costs[1]) / 2
  out = str(s['root'] / 'budget')
  summary = batch.run(s['bb'], s['wd'], out, labels=s['labels'], budget=budget, chunk=4,
                      engine=s['eng'], warm=False)
  ok = [r for r in _lines(out) if r['status'] == 'ok']
  assert len(ok) == N_GOOD and summary['budget_gmacs'] == budget
  # each chunk (4 + 1 inputs) within the budget, so the run too
  assert np.mean([r['gmacs'] for r in ok[:4]]) <= budget + 1e-9
  assert summary['mean_gmacs'] <= budget + 1e-9
  with pytest.raises(InferError, match='budget'):
    batch.run(s['bb'], s['wd'], str(s['root'] / 'b2'), labels=s['labels'],
              budget=float(costs.min()) / 2, engine=s['eng'], warm=False)
  c = s['c']
  args = [sys.executable, str(REPO / 'infer.py'), '--config',
          str(REPO / 'configs' / 'oasis_synthetic.py') + ':tiny', '--workdir', s['wd'],
          '--config.branches.use_bank=False', f'--config.data.data_dir={c.data.data_dir}',
          '--labels', s['labels'], '--out', str(s['root'] / 'cli')]
  r = subprocess.run(args + ['--budget', '1.0', '--threshold', '0.2'], capture_output=True,
                     text=True, cwd=REPO, timeout=300)
  assert r.returncode != 0 and '--budget=1 and --threshold' in r.stderr, r.stderr[-2000:]
  r = subprocess.run(args + ['--rule', 'paper', '--threshold', '0.3', '--chunk', '2',
                             '--nowarm'], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert got['num_ok'] == N_GOOD and got['num_errors'] == 1 and got['rule'] == 'paper'
  assert '[batch] skipped broken.png' in r.stdout


def test_a_data_split_and_the_budget_sweep(setup):
  """`--split test` routes the prepared split's maps (one line each, named by index); `--sweep
  --budget G` routes the predictor's test rows within G GMACs per input and says so."""
  from fiancee_jax.infer import sweep  # noqa: PLC0415
  s = setup
  c = s['c']
  out = str(s['root'] / 'split')
  summary = batch.run(s['bb'], s['wd'], out, split='test', threshold=0.3,
                      rule=rules.check('paper'), chunk=4, engine=s['eng'], warm=False)
  lines = _lines(out)
  assert summary['num_ok'] == len(lines) == c.data.num_test
  assert all(r['status'] == 'ok' and os.path.isfile(r['image']) for r in lines)
  assert len({r['name'] for r in lines}) == c.data.num_test
  costs = s['eng'].costs
  budget = float(costs[0] + costs[-1]) / 2
  rep = sweep.budget_sweep(s['bb'], s['wd'], budget, engine=s['eng'], repeats=1,
                           out_dir=str(s['root'] / 'report'))
  assert rep['num_test'] == c.predictor.num_test
  assert rep['mean_gmacs'] <= budget + 1e-9 and sum(rep['exit_counts']) == rep['num_test']
  assert 0 <= rep['violation_rate_at_target'] <= 1 and rep['latency']['speedup'] > 0
  with open(rep['path']) as f:
    assert json.load(f)['budget_gmacs'] == budget

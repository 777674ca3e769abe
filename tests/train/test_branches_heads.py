"""Head-avatar branches stage (train.py --stage=branches, megaportraits): one real guided step
of two exits on 4 devices (every Eq. S3 term but VGG finite, only branches / discriminator
copies change, each copy its own way), stop by SIGTERM and resume, samples, the pipeline
loads the trained branches."""
import glob
import os
import signal

import jax
import numpy as np
import pytest

from fiancee_jax import workdir as wdir
from fiancee_jax import registry
from fiancee_jax.core import stages
from fiancee_jax.train import branches as tb
from fiancee_jax.train import checkpoint
from tests.conftest import heads_workdir


def _leaves_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_branch_step_and_resume(tmp_path_factory):
  c, wd, bb_state = heads_workdir(tmp_path_factory)
  c = c.copy_and_resolve_references()  # the shared config stays as it is
  c.branches.num_steps = 2
  c.branches.ckpt_every = 1
  c.branches.log_every = 1
  c.branches.sample_every = 2
  c.train.loss_weights.vgg = 0.0   # keep the CPU test small (the VGG19 loss has its own tests)
  c.branches.exits = (4, 6)          # two exits (each with its own D copy) compile faster
  bb = registry.get(c)
  stages.build_bank(bb, wd, progress=False)
  seen = []

  def hook(step, st, m):
    seen.append((jax.device_get(m), jax.device_get(st.frozen.generator)))
    os.kill(os.getpid(), signal.SIGTERM)  # stop after step 1: checkpoint, then resume

  state1 = tb.train_and_evaluate(bb, wd, hooks=[hook])
  metrics, gen_after = seen[0]
  assert int(state1.step) == 1
  for k in c.branches.exits:
    for term in ('adv', 'ms_ssim', 'l1', 'fm', 'total', 'd_loss', 'd_real', 'd_fake'):
      assert np.isfinite(float(metrics[f'exit{k}/{term}'])), (k, term)
    assert 0 < float(metrics[f'exit{k}/l1']) < 2         # untrained exit != backbone image
  total = sum(float(metrics[f'exit{k}/total']) for k in c.branches.exits)
  np.testing.assert_allclose(float(metrics['b_total']), total, rtol=1e-5)
  assert float(metrics['lr']) == pytest.approx(c.branches.lr)
  # backbone untouched; branches and every discriminator copy changed, each differently
  g_params, g_coll, _ = checkpoint.load_backbone(wd, c)
  assert _leaves_equal(gen_after, {'params': g_params, **g_coll})
  host0 = tb.create_train_state(bb, tb.build_models(bb), tb.load_backbone_discriminator(bb, wd))
  assert not _leaves_equal(state1.params_b, host0.params_b)
  copies = [jax.tree.map(lambda x, i=i: x[i], state1.params_d)
            for i in range(len(c.branches.exits))]
  assert not any(_leaves_equal(d, bb_state.params_d) for d in copies)
  assert not _leaves_equal(copies[0], copies[1])
  # resume: the same command continues from step 1
  state2 = tb.train_and_evaluate(bb, wd)
  assert int(state2.step) == 2
  assert not _leaves_equal(state2.params_b, state1.params_b)
  assert sorted(os.listdir(wdir.checkpoint_dir(wd, 'branches'))) == ['1', '2']
  pngs = sorted(glob.glob(os.path.join(wd, 'samples', 'branches_*.png')))
  assert [os.path.basename(p) for p in pngs] == ['branches_0000001.png', 'branches_0000002.png']
  p = stages.load_pipeline(bb, wd, stages=('backbone', 'bank', 'branches'))
  assert _leaves_equal(p.params['branches']['params'], state2.params_b)
  assert p.costs.shape == (len(c.branches.exits) + 1,) and np.all(p.costs > 0)

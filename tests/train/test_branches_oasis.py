"""OASIS branches stage: one real step (losses finite, only branch / D params change), resume."""
import os
import shutil
import signal

import jax
import numpy as np

from fiancee_jax import registry
from fiancee_jax.core import stages
from fiancee_jax.train import branches as tb
from fiancee_jax.train import checkpoint
from tests.conftest import backbone_workdir


def _leaves_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_branch_step_and_resume(tmp_path_factory, tmp_path):
  c, shared_wd, bb_state = backbone_workdir(tmp_path_factory)
  c = c.copy_and_resolve_references()  # the shared config and workdir stay as they are
  wd = str(tmp_path / 'wd')
  shutil.copytree(os.path.join(shared_wd, 'checkpoints'), os.path.join(wd, 'checkpoints'))
  c.branches.exits = (1, 3)           # two exits (each with its own D copy) compile faster
  c.branches.alpha_vgg = 0.0          # keep the CPU test small (VGG19 loss has its own tests)
  c.train.labelmix_lambda = 0.0
  c.branches.num_steps = 2
  c.branches.ckpt_every = 1
  bb = registry.get(c)
  stages.build_bank(bb, wd, progress=False)
  seen = []
  host0 = tb.create_train_state(bb, tb.build_models(bb), tb.load_backbone_discriminator(bb, wd),
                                generator=stages.load_backbone(bb, wd)[0])

  def hook(step, st, m):
    seen.append((jax.device_get(m), jax.device_get(st.frozen.generator)))
    os.kill(os.getpid(), signal.SIGTERM)  # stop after step 1: checkpoint, then resume

  state1 = tb.train_and_evaluate(bb, wd, hooks=[hook])
  metrics, gen_after = seen[0]
  assert int(state1.step) == 1
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert 0 < float(metrics['exit1/lpips']) < 2
  # backbone untouched, branches changed; step 1 is the warm-up (tiny: warmup_steps 1), so
  # the discriminators are still the backbone's
  assert c.branches.warmup_steps == 1 and 'exit1/l1' in metrics
  g_params, g_coll, _ = checkpoint.load_backbone(wd, c)
  assert _leaves_equal(gen_after, {'params': g_params, **g_coll})
  assert not _leaves_equal(state1.params_b, host0.params_b)
  assert _leaves_equal(jax.tree.map(lambda x: x[0], state1.params_d), bb_state.params_d)
  # resume: the same command continues from step 1, with the adversarial step (Eq. S1)
  state2 = tb.train_and_evaluate(bb, wd)
  assert int(state2.step) == 2
  assert not _leaves_equal(state2.params_b, state1.params_b)
  for i in range(len(c.branches.exits)):
    d_i = jax.tree.map(lambda x: x[i], state2.params_d)
    assert not _leaves_equal(d_i, bb_state.params_d)
  p = stages.load_pipeline(bb, wd, stages=('backbone', 'bank', 'branches'))
  assert _leaves_equal(p.params['branches']['params'], state2.params_b)
  # an exported checkpoint (what assets/ ships) continues at its step, from its branch
  # variables, with a fresh optimiser and the backbone's discriminator copies
  wd3 = str(tmp_path / 'wd3')
  shutil.copytree(wd, wd3, ignore=shutil.ignore_patterns('branches'))
  checkpoint.export(wd, 'branches', wd3, keep=('branches',))
  c.branches.num_steps = 3
  seen.clear()
  state3 = tb.train_and_evaluate(
      bb, wd3, hooks=[lambda step, st, m: seen.append(step)])
  assert seen == [3]
  assert int(state3.step) == 3
  assert not _leaves_equal(state3.params_b, state2.params_b)
  # one Adam step (<= ~lr per weight) from the exported variables, not from a fresh init
  fresh = tb.create_train_state(bb, tb.build_models(bb), tb.load_backbone_discriminator(bb, wd))
  dist = lambda a, b: max(float(np.abs(np.asarray(x) - np.asarray(y)).max())  # noqa: E731
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert dist(state3.params_b, state2.params_b) < 3 * c.branches.lr
  assert dist(fresh.params_b, state2.params_b) > 30 * c.branches.lr


def test_branch_sn_kernels_follow_the_backbone_init(tmp_path_factory):
  """train.sn_kernel_init='torch_default' (the backbone's SN parametrisation, layers.py) also
  rescales the branches' spectral-norm kernels: the same function, kernels of PyTorch's
  default size; every other parameter is the xavier init's."""
  import flax  # noqa: PLC0415
  c, wd, _ = backbone_workdir(tmp_path_factory)
  c = c.copy_and_resolve_references()
  bb = registry.get(c)
  disc = tb.load_backbone_discriminator(bb, wd)
  models = tb.build_models(bb)
  states = {}
  for init in ('xavier', 'torch_default'):
    c.train.sn_kernel_init = init
    states[init] = tb.create_train_state(bb, models, disc)
  flat = {k: flax.traverse_util.flatten_dict(s.params_b) for k, s in states.items()}
  sn = {p[:-1] for p in flax.traverse_util.flatten_dict(states['xavier'].state_b['spectral'])}
  assert sn
  for path, x in flat['xavier'].items():
    y = flat['torch_default'][path]
    if path[:-1] in sn and path[-1] == 'kernel':
      kh, kw, cin, cout = x.shape
      want = (3.0 * kh * kw * cin) ** -0.5 / (0.02 * (2.0 / (kh * kw * (cin + cout))) ** 0.5)
      np.testing.assert_allclose(np.asarray(y), np.asarray(x) * want, rtol=1e-5)
    else:
      np.testing.assert_array_equal(np.asarray(y), np.asarray(x))

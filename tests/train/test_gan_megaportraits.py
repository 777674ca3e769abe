"""Backbone stage (train/gan.py + backbones/megaportraits/gan.py) on the tiny head-avatar
config: a real run writes checkpoints, samples and TensorBoard events; exact resume after
SIGTERM (4 steps == 2 + kill + resume 2); one step on 4 devices (shard_map) equals one step
on 1 device on the same global batch."""
import glob
import os
import signal

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from fiancee_jax import workdir as wdir
from fiancee_jax import config as cfg
from fiancee_jax import data as fdata
from fiancee_jax import registry
from fiancee_jax.train import checkpoint, gan

CONFIGS = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')


def _config(data_dir):
  c = cfg.load(os.path.join(CONFIGS, 'megaportraits_synthetic.py'), 'tiny')
  c.data.data_dir = str(data_dir)
  c.data.num_identities = 5      # 3 train identities: the samples get cross-reenactment rows
  c.train.batch_size = 4         # divides by the 4 test devices
  c.train.num_steps = 4
  return c


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('heads_data')


def _sigterm_after(n):
  def hook(step, state, metrics):  # noqa: ARG001
    if step == n:
      os.kill(os.getpid(), signal.SIGTERM)   # the real signal path: finish step, save, return
  return hook


def _assert_close(a, b, atol, rtol=0.0):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                          strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol,
                               err_msg=jax.tree_util.keystr(path))


def test_train_samples_checkpoints_and_exact_resume(tmp_path, data_dir):
  seen = []
  comp = gan.compiled(registry.get(_config(data_dir)))   # one compilation for the 3 runs

  def run(workdir, **kw):
    return gan.train_and_evaluate(registry.get(_config(data_dir)), workdir, comp=comp, **kw)

  straight = run(str(tmp_path / 'a'),
                 hooks=[lambda step, s, m: seen.append({k: float(v) for k, v in m.items()})])
  assert int(straight.step) == 4
  # Every Eq. S3 term but gaze (off) + angle supervision; lr cosine from lr_g towards min_lr.
  c = _config(data_dir)
  assert {'g_adv', 'g_vgg', 'g_ms_ssim', 'g_l1', 'g_fm', 'g_angles', 'g_total', 'd_loss',
          'd_real', 'd_fake'} <= set(seen[0]) and 'g_gaze' not in seen[0]
  assert all(np.isfinite(v) for m in seen for v in m.values())
  lrs = [m['lr'] for m in seen]
  assert lrs[0] == pytest.approx(c.train.lr_g) and lrs == sorted(lrs, reverse=True)
  assert lrs[-1] < 0.9 * c.train.lr_g

  wd = str(tmp_path / 'b')
  stopped = run(wd, hooks=[_sigterm_after(2)])
  assert int(stopped.step) == 2
  ckdir = wdir.checkpoint_dir(wd, 'backbone')
  assert sorted(os.listdir(ckdir)) == ['2']
  resumed = run(wd)
  assert int(resumed.step) == 4
  _assert_close(straight, resumed, atol=1e-6)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), stopped.params_d,
                       resumed.params_d)
  assert max(jax.tree.leaves(moved)) > 1e-6   # D trained between step 2 and 4

  # What a user looks at: samples (source | driver | EMA generator | target; 4 self- and 4
  # cross-reenactment rows), TensorBoard events, checkpoints 2 and 4.
  assert sorted(os.listdir(ckdir)) == ['2', '4']
  pngs = sorted(glob.glob(os.path.join(wd, 'samples', '*.png')))
  assert [os.path.basename(p) for p in pngs] == ['step_0000002.png', 'step_0000004.png']
  h = c.data.height
  assert Image.open(pngs[-1]).size == (4 * h, 8 * h)
  assert glob.glob(os.path.join(wd, 'tensorboard', 'events.out.tfevents.*'))

  # Later stages read the EMA generator through the one backbone loader.
  params, coll, meta = checkpoint.load_backbone(wd, _config(data_dir))
  assert meta['step'] == 4 and set(coll) == {'batch_stats'}
  jax.tree.map(np.testing.assert_array_equal, params, resumed.ema_params_g)
  refreshed = coll['batch_stats']['g2d']['block1']['norm_0']['mean']
  ema = resumed.ema_state_g['batch_stats']['g2d']['block1']['norm_0']['mean']
  assert np.all(np.isfinite(refreshed)) and not np.allclose(refreshed, ema)


def test_four_devices_equal_one(data_dir):
  c = _config(data_dir)
  # Without the VGG term: its L1 on VGG19 features of masked frames (the identical zeroed
  # backgrounds of fake and target give features ~1e3 that differ in their last bits) has
  # gradient sign(rounding noise) wherever the true difference is below float32 resolution,
  # and 1 vs 4 devices round differently (measured: with all-foreground masks the VGG
  # gradients agree to 1e-5 of their largest entry). VGG is a plain mean over equal
  # per-device shards; what this test checks is the data-parallel wiring: sync BN, the masked
  # L1's global normaliser, pmean of gradients.
  c.train.loss_weights.vgg = 0.0
  bb = registry.get(c)
  comp4 = gan.compiled(bb)                 # all 4 devices
  dp4 = comp4.step
  assert dp4.num_devices == 4
  dp1 = gan.compiled(bb, devices=jax.devices()[:1]).step
  task = bb.gan_task()
  init = gan.create_train_state(bb, comp4)
  state0 = gan.step_state(task, init)
  fdata.prepare(c.data, str(data_dir))
  src = fdata.source(c.data, 'train', str(data_dir))
  batch = next(task.loader(src, 4, seed=0))
  ref, ref_metrics = dp1(dp1.put_state(state0), dp1.put_batch(batch))
  out, metrics = dp4(dp4.put_state(state0), dp4.put_batch(batch))
  ref, out = dp1.get_state(ref.train), dp4.get_state(out.train)
  for k in ref_metrics:
    np.testing.assert_allclose(float(metrics[k]), float(ref_metrics[k]), rtol=1e-4, atol=1e-5,
                               err_msg=k)
  _assert_close(out.state_g, ref.state_g, atol=2e-5, rtol=1e-4)   # synced BN running stats
  for p, opt in (('params_g', 'opt_g'), ('params_d', 'opt_d')):
    # AdamW's first moment after one step is (1 - beta1) * gradient: the gradients agree to
    # 1e-4 of each tensor's largest entry, + 1e-6 of the largest gradient anywhere (the
    # rounding noise of gradients that are 0 in exact arithmetic, e.g. conv biases right
    # before a norm layer, scales with the loss).
    mu, mu_ref = (optax.tree_utils.tree_get(getattr(s, opt), 'mu') for s in (out, ref))
    g_max = max(float(np.abs(g).max()) for g in jax.tree.leaves(mu_ref))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(mu), jax.tree.leaves(mu_ref),
                            strict=True):
      a, b = np.asarray(a), np.asarray(b)
      assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max() + 1e-6 * g_max, \
          jax.tree_util.keystr(path)
    # The first Adam step moves each param by ~lr * sign(gradient): equal wherever the
    # gradient is not rounding noise (Adam turns that noise into +-lr).
    for (path, a), b, g in zip(jax.tree_util.tree_leaves_with_path(getattr(out, p)),
                               jax.tree.leaves(getattr(ref, p)), jax.tree.leaves(mu_ref),
                               strict=True):
      g = np.abs(np.asarray(g))
      live = g > max(1e-5 * g_max, 1e-3 * g.max())
      np.testing.assert_allclose(np.asarray(a)[live], np.asarray(b)[live], atol=2e-6,
                                 rtol=1e-4, err_msg=jax.tree_util.keystr(path))
  assert not np.allclose(ref.state_g['batch_stats']['g2d']['block1']['norm_0']['mean'],
                         init.state_g['batch_stats']['g2d']['block1']['norm_0']['mean'])

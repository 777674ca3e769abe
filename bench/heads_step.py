"""Head-avatar backbone step, whole and by part, at the synthetic config (one device).

  python bench/heads_step.py [--config configs/megaportraits_synthetic.py] [--repeats 5]

Each part is its own jitted forward + backward on the step's shapes (batch train.batch_size,
data.height x data.width), timed as the median of --repeats after one warm-up call:
  front_end+g2d   the generator (appearance + motion encoders, fusion, G2D), L1 loss
  vgg19           masked VGG19 perceptual loss, gradient w.r.t. the image
  ms_ssim         masked MS-SSIM, gradient w.r.t. the image
  patch_d         multi-scale patch D: hinge on real + fake, gradient w.r.t. D's params
  d_on_fake_fm    D on the masked fake + on the target (feature matching), gradient w.r.t. the fake
  step            backbones.megaportraits.gan.HeadsGAN.train_step: G update + D update + EMA
                  (what train.py --stage=backbone runs, through train/gan.py)
One JSON line per part ({"name", "value" (ms), "unit", "device", ...}) and the parts' sum vs
the step (the step shares work between terms, so the sum is an upper bound).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from fiancee_jax import config as cfg
from fiancee_jax import registry
from fiancee_jax.backbones.megaportraits import losses as losses_heads
from fiancee_jax.train import gan


def _median_ms(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='configs/megaportraits_synthetic.py')
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--parts', default='front_end+g2d,vgg19,ms_ssim,patch_d,d_on_fake_fm,step')
  args = ap.parse_args()
  c = cfg.load(args.config)
  b, h, w = c.train.batch_size, c.data.height, c.data.width
  dev = jax.devices()[0]
  device = f'{dev.platform}:{dev.device_kind} ({platform.machine()}, {jax.device_count()} dev)'
  rng = np.random.default_rng(0)
  img = lambda: jnp.asarray(rng.uniform(-1, 1, (b, h, w, 3)), jnp.float32)  # noqa: E731
  source, driver, fake = img(), img(), img()
  mask = jnp.asarray(rng.uniform(size=(b, h, w, 1)) > 0.3, jnp.float32)
  bb = registry.get(c)
  task = bb.gan_task(axis_name=None)
  state = gan.create_train_state(bb)
  frozen = task.frozen()
  g_vars = {'params': state.params_g, **state.state_g}
  d_params = state.params_d
  gen, disc = task.generator_local, task.discriminator

  def g_part(p):
    (out, _), _ = gen.apply({**g_vars, 'params': p}, source, driver, True,
                            mutable=list(state.state_g))
    return jnp.mean(jnp.abs(out - driver))

  def vgg_part(x):
    return losses_heads.masked_vgg(frozen['vgg'], x, driver, mask)

  def ssim_part(x):
    return losses_heads.masked_ms_ssim(x, driver, mask)

  def d_part(p):
    return losses_heads.d_loss(p, {'driver': driver, 'mask': mask}, fake, disc=disc)[0]

  def fm_part(x):
    logits, acts = disc.apply({'params': d_params}, losses_heads.apply_mask(x, mask))
    real = disc.apply({'params': d_params}, losses_heads.apply_mask(driver, mask))[1]['feats']
    return losses_heads.hinge_g(logits) + losses_heads.feature_matching(real, acts['feats'])

  parts = {
      'front_end+g2d': (jax.jit(jax.grad(g_part)), state.params_g),
      'vgg19': (jax.jit(jax.grad(vgg_part)), fake),
      'ms_ssim': (jax.jit(jax.grad(ssim_part)), fake),
      'patch_d': (jax.jit(jax.grad(d_part)), d_params),
      'd_on_fake_fm': (jax.jit(jax.grad(fm_part)), fake),
  }
  results = {}
  for name in args.parts.split(','):
    if name == 'step':
      # The step's own task (sync BN over the data axis), on one device.
      dp = gan.Compiled(bb.gan_task(), 'shard_map', devices=jax.devices()[:1]).step
      carry = dp.put_state(gan.step_state(task, state))
      batch = dp.put_batch({
          'source_image': np.asarray((source + 1) * 127.5, np.uint8),
          'driver_image': np.asarray((driver + 1) * 127.5, np.uint8),
          'driver_mask': np.asarray(mask[..., 0] * 255, np.uint8),
          'driver_pose': rng.uniform(-30, 30, (b, 3)).astype(np.float32)})
      held = [carry]  # the step donates its state: each call runs on the previous output

      def step(bt):
        held[0], metrics = dp(held[0], bt)
        return metrics
      ms = _median_ms(step, batch, repeats=args.repeats)
    else:
      fn, arg = parts[name]
      ms = _median_ms(fn, arg, repeats=args.repeats)
    results[name] = ms
    print(json.dumps({'name': f'heads_step/{name}', 'value': round(ms, 2), 'unit': 'ms',
                      'batch': b, 'resolution': [h, w], 'device': device,
                      'repeats': args.repeats}), flush=True)
  if 'step' in results:
    rest = sum(v for k, v in results.items() if k != 'step')
    print(json.dumps({'name': 'heads_step/parts_sum_over_step', 'value': round(rest / results['step'], 3),
                      'unit': 'ratio', 'device': device}), flush=True)


if __name__ == '__main__':
  main()

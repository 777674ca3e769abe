"""The branch stage's step, by option, and how fast each option gets the exits close to the
backbone: the measurements behind the demo config's branch-stage keys.

  python bench/branch_step.py --workdir runs/demo [--config configs/oasis_synthetic.py]
      [--repeats 3] [--train_steps 60] [--eval_every 20] [--num_eval 16] [--part time|train|all]

Needs a workdir with the backbone and bank stages done (`make demo` stops after them with
`--stages`, or: train.py --stage=backbone, build_bank.py). One device, the config's
branches.batch_size, the same loader batches for every option (same seed).

time: one JSON line per step variant (median ms of --repeats after a warm-up call, ratio to
  the paper step), all in this process:
    paper           Eq. S1: 4 exits x (D copy + VGG19 + LPIPS) fwd/bwd, then the 4 D updates
    paper_no_vgg19  the same with branches.alpha_vgg = 0 (LPIPS's VGG16 the one trunk)
    distill         warm-up step: L1 + VGG19 + LPIPS vs the backbone image, no discriminator
                    (branches.distill_vgg = alpha_vgg)
    distill_lpips   warm-up step with one trunk (distill_vgg = 0, the config default)
    frozen_forward  the frozen backbone's part of every step (prefix, guide, blocks, image):
                    the most that caching the backbone's outputs on disk could save
train: for each (init, objective) option (objective 'paper' = Eq. S1 with VGG19, 'distill' =
  the warm-up step at the config's distill_vgg), --train_steps steps from the same start; every
  --eval_every steps the mean LPIPS of every exit vs the backbone image on the first
  --num_eval validation maps with fixed noises (one JSON line each, with the seconds spent).
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from fiancee_jax import cli
from fiancee_jax import config as cfg
from fiancee_jax import data as fdata
from fiancee_jax import registry
from fiancee_jax import workdir as wd
from fiancee_jax.infer.engine import device_name, time_fn
from fiancee_jax.metrics import lpips as lpips_lib
from fiancee_jax.train import branches as tb
from fiancee_jax.train import parallel


class Setup:
  """Models, frozen inputs, a fixed batch stream and the eval rows for one config."""

  def __init__(self, config, workdir: str):
    self.backbone = registry.get(config)
    self.models = tb.build_models(self.backbone)
    self.frozen, _ = tb.load_frozen(self.backbone, workdir, self.models)
    self.disc = tb.load_backbone_discriminator(self.backbone, workdir)
    data_dir = wd.data_dir(config, workdir)
    fdata.prepare(config.data, data_dir)
    self.train_src = fdata.source(config.data, 'train', data_dir)
    self.val_src = fdata.source(config.data, 'validation', data_dir)
    self.config = config

  def batches(self, n: int) -> list:
    loader = self.models.losses.train_loader(
        self.train_src, self.config.branches.batch_size, seed=self.config.seed + 11,
        state=None, process_index=0, process_count=1)
    it = iter(loader)
    return [next(it) for _ in range(n)]

  def state(self, init: str):
    self.config.branches.init = init
    host = tb.create_train_state(self.backbone, self.models, self.disc,
                                 generator=self.frozen.generator)
    return tb.BranchState(train=host, frozen=self.frozen)


def _variant_config(config, alpha_vgg: float, distill_vgg: float):
  c = config.copy_and_resolve_references()
  c.branches.alpha_vgg, c.branches.distill_vgg = alpha_vgg, distill_vgg
  return c


def time_part(config, workdir: str, repeats: int) -> None:
  base = float(config.branches.alpha_vgg)
  variants = [('paper', base, 0.0, True), ('paper_no_vgg19', 0.0, 0.0, True),
              ('distill', base, base, False), ('distill_lpips', base, 0.0, False)]
  results, dev = {}, device_name()
  for name, alpha, distill_vgg, adversarial in variants:
    s = Setup(_variant_config(config, alpha, distill_vgg), workdir)
    dp = parallel.wrap(tb.make_step(s.models, adversarial), 'shard_map')
    batches = [dp.put_batch(b) for b in s.batches(repeats + 1)]
    state = dp.put_state(s.state('random'))
    state, m = dp(state, batches[0])
    jax.block_until_ready(m)
    times = []
    for b in batches[1:]:
      t0 = time.perf_counter()
      state, m = dp(state, b)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    results[name] = float(np.median(times))
    if name == 'paper':
      ff = jax.jit(lambda fr, b: tb.frozen_forward(
          s.models, fr, s.models.losses.step_inputs(b, jnp.zeros((2,), jnp.uint32),
                                                     jnp.int32(0), None)[0]))
      host_b = jax.tree.map(np.asarray, s.batches(1)[0])
      fr = dp.one_copy(state.frozen)   # the step donates its input state
      results['frozen_forward'] = time_fn(lambda: ff(fr, host_b), repeats)
    del state
  for name, sec in results.items():
    print(json.dumps({'name': f'branch_step/{name}', 'value': 1e3 * sec, 'unit': 'ms',
                      'ratio_to_paper': sec / results['paper'],
                      'batch': int(config.branches.batch_size), 'repeats': repeats,
                      'config': config.name, 'device': dev}), flush=True)


def _eval_lpips(s: Setup, images, lp, state, dp, rows) -> list[float]:
  host = dp.get_state(state.train)
  fr = dp.one_copy(state.frozen)
  params = {'generator': fr.generator, 'bank': fr.bank,
            'branches': {'params': host.params_b, **host.state_b}}
  out = images(params, *rows)
  ref = jnp.asarray(out['backbone'])
  return [float(np.mean(np.asarray(lp(jnp.asarray(out[k]), ref)))) for k in s.models.exits]


def train_part(config, workdir: str, steps: int, every: int, num_eval: int) -> None:
  options = [('random', 'paper'), ('backbone', 'paper'), ('random', 'distill'),
             ('backbone', 'distill')]
  lp, dev = lpips_lib.load(), device_name()
  for init, objective in options:
    s = Setup(config.copy_and_resolve_references(), workdir)
    dp = parallel.wrap(tb.make_step(s.models, objective == 'paper'), 'shard_map')
    images = tb.images_fn(s.backbone, s.models.use_bank)
    rows, _, _ = s.models.losses.eval_rows(s.val_src, num_eval)
    state = dp.put_state(s.state(init))
    spent = 0.0
    for step, batch in enumerate(s.batches(steps + 1)):
      if step % every == 0 or step == steps:
        ev = _eval_lpips(s, images, lp, state, dp, rows)
        print(json.dumps({'name': 'branch_train/lpips', 'init': init, 'objective': objective,
                          'step': step, 'seconds': spent, 'mean_lpips': float(np.mean(ev)),
                          **{f'exit{k}': v for k, v in zip(s.models.exits, ev)},
                          'num_eval': num_eval, 'config': config.name, 'device': dev}),
              flush=True)
      if step == steps:
        break
      t0 = time.perf_counter()
      state, m = dp(state, dp.put_batch(batch))
      jax.block_until_ready(m)
      spent += time.perf_counter() - t0


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='configs/oasis_synthetic.py')
  ap.add_argument('--workdir', default='runs/demo')
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--train_steps', type=int, default=60)
  ap.add_argument('--eval_every', type=int, default=20)
  ap.add_argument('--num_eval', type=int, default=16)
  ap.add_argument('--part', choices=('time', 'train', 'all'), default='all')
  a = ap.parse_args()
  config = cfg.load(a.config)
  cli.compilation_cache(a.workdir)
  if a.part in ('time', 'all'):
    time_part(config, a.workdir, a.repeats)
  if a.part in ('train', 'all'):
    train_part(config, a.workdir, a.train_steps, a.eval_every, a.num_eval)


if __name__ == '__main__':
  main()

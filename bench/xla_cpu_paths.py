"""The three XLA:CPU slow paths the training and inference code avoid, each measured side by side.

  python bench/xla_cpu_paths.py [--repeats 3]

1. Discriminator copies (one per exit, `train/state.py: per_copy`): fwd + bwd of the
   oasis_synthetic OASIS discriminator, 4 copies on 4 images each at 64x128, vmapped over the
   copies' weights (grouped convolutions) vs `lax.map` vs unrolled (what the code does).
2. Small-map 3x3 convolution (`models/layers.py: conv_same`): 256 -> 256 channels at batch 30,
   `lax.conv_general_dilated` vs im2col + matmul, on 2x4 maps (the demo's first blocks; what
   the code turns into a matmul) and 4x8 maps (where it keeps the convolution).
3. Weight gradient of a stride-1 4x4 conv (the pix2pixHD patch discriminator's last two
   layers, `models/layers.py: conv`): XLA's own gradient vs the im2col matmul the code uses,
   batch 8, 256 -> 512 channels, on 8x8 and 16x16 maps (and the 3x3 case, unaffected).

Prints one JSON line per figure, with the ratio to the path the code takes.
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
from jax import lax

from fiancee_jax import config as cfg
from fiancee_jax.backbones.oasis import discriminator as discriminators
from fiancee_jax.nn import layers
from fiancee_jax.nn.layers import conv_same
from fiancee_jax.train.state import per_copy


def _median_s(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def _emit(name, seconds, reference, **extra):
  print(json.dumps({'name': name, 'value': 1e3 * seconds, 'unit': 'ms',
                    'ratio_to_code_path': seconds / reference,
                    'device': str(jax.devices()[0]), **extra}), flush=True)


def discriminator_copies(repeats: int) -> None:
  c = cfg.load('configs/oasis_synthetic.py')
  disc = discriminators.from_config(c)
  e, b = 4, 4
  x = jax.random.normal(jax.random.PRNGKey(1), (e, b, c.data.height, c.data.width, 3))
  v = disc.init(jax.random.PRNGKey(0), x[0], train=True)
  coll = {k: val for k, val in v.items() if k != 'params'}
  stack = lambda t: jax.tree.map(lambda a: jnp.stack([a] * e), t)  # noqa: E731
  params, colls = stack(v['params']), stack(coll)

  def one(p, cl, img):
    (logits, _), _ = disc.apply({'params': p, **cl}, img, train=True, mutable=list(cl))
    return jnp.mean(logits ** 2)

  variants = {
      'vmap': lambda p, cl, img: jnp.sum(jax.vmap(one)(p, cl, img)),
      'lax_map': lambda p, cl, img: jnp.sum(lax.map(lambda t: one(*t), (p, cl, img))),
      'unrolled': lambda p, cl, img: jnp.sum(per_copy(one, p, cl, img)),
  }
  secs = {k: _median_s(jax.jit(jax.grad(f, argnums=(0, 2))), (params, colls, x), repeats)
          for k, f in variants.items()}
  for k, s in secs.items():
    _emit(f'disc_copies_fwd_bwd_{k}', s, secs['unrolled'], copies=e, batch=b)


def small_map_conv(repeats: int) -> None:
  def im2col(x, k):
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1:3]
    cols = jnp.stack([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=3)
    return jnp.einsum('bhwtc,tcd->bhwd', cols, k.reshape(9, *k.shape[2:]))

  def conv(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  kern = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 256, 256))
  for h, w in ((2, 4), (4, 8)):
    x = jax.random.normal(jax.random.PRNGKey(0), (30, h, w, 256))
    secs = {k: _median_s(jax.jit(f), (x, kern), repeats)
            for k, f in (('conv', conv), ('im2col', im2col), ('conv_same', conv_same))}
    for k, s in secs.items():
      _emit(f'conv3x3_{h}x{w}_{k}', s, secs['conv_same'], batch=30, channels=256)


def even_kernel_weight_grad(repeats: int) -> None:
  def xla(x, k, p):
    return lax.conv_general_dilated(x, k, (1, 1), ((p, p), (p, p)),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  for ks, pad in ((4, 2), (3, 1)):
    kern = 0.05 * jax.random.normal(jax.random.PRNGKey(1), (ks, ks, 256, 512))
    for h in (8, 16):
      x = jax.random.normal(jax.random.PRNGKey(0), (8, h, h, 256))
      secs = {name: _median_s(jax.jit(jax.grad(lambda k, x, f=f: jnp.sum(f(x, k, pad) ** 2))),
                              (kern, x), repeats)
              for name, f in (('xla', xla),
                                ('code', lambda x, k, p: layers.conv(x, k, (1, 1), p)))}
      for name, sec in secs.items():
        _emit(f'conv{ks}x{ks}_s1_{h}x{h}_weight_grad_{name}', sec, secs['code'], batch=8,
              channels=[256, 512])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--repeats', type=int, default=3)
  a = ap.parse_args()
  discriminator_copies(a.repeats)
  small_map_conv(a.repeats)
  even_kernel_weight_grad(a.repeats)


if __name__ == '__main__':
  main()

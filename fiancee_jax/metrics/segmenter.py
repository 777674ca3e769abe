"""A semantic segmenter for generated street scenes and mIoU (OASIS / FIANCEE Table S1).

OASIS scores a generator by segmenting its images with a network trained on the *real* images
and comparing the prediction with the input label map (mIoU). For `synthetic_streets` there is
no pretrained DRN / UperNet, so we train our own: a small U-Net (`UNet`, GroupNorm + ReLU,
`SegConfig.widths` channels per level, max-pool down, nearest up, skip concatenation),
per-pixel softmax cross-entropy weighted by class frequency ** -0.5 (`class_weights`: rare
classes count for more, as mIoU does) on the dataset's real train images + label maps, Adam
with a cosine decay, random horizontal flips. Its mIoU on the real test images is the ceiling
a generator can reach under this metric. Demo settings (`DEMO`, 700 steps of 8 images at
64x128): 813 s on the shared 2-core CPU, mIoU 0.562 on the 200 real test images (18 classes
occur), 0.560 on 200 train images (under-fitted rather than over-fitted: more steps would
raise the ceiling).

  python -m fiancee_jax.metrics.segmenter --config configs/oasis_synthetic.py --workdir runs/demo

Cached per workdir: `<workdir>/segmenter/segmenter.npz` (written atomically every
`ckpt_every` steps with the Adam state, so a killed run resumes; the file carries the cache
key: segmenter settings + the data config). `ensure(config, workdir)` trains once, then loads.
Deterministic given `SegConfig.seed`: the batch and flips of step t come from
`default_rng([seed, t])`, so a resumed run takes the same batches.

mIoU (`confusion`, `miou_from_confusion`, `miou`): one confusion matrix over the whole
evaluated set (rows = label, columns = prediction), IoU_c = TP / (TP + FP + FN) for every class
with TP + FP + FN > 0 (present in the labels *or* the predictions: a class predicted where it
never occurs counts with IoU 0), mean over those classes; `ignore_index` pixels are dropped.
"""
from __future__ import annotations

import argparse
import functools
import dataclasses
import hashlib
import io
import json
import os
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fiancee_jax.errors import FianceeError
from fiancee_jax.io_utils import atomic_open

FILE = 'segmenter.npz'
_print = functools.partial(print, flush=True)


class SegmenterError(FianceeError):
  """Bad segmenter / mIoU inputs or an unusable segmenter checkpoint."""


@dataclasses.dataclass(frozen=True)
class SegConfig:
  widths: tuple[int, ...] = (12, 24, 48, 96)
  steps: int = 700
  batch_size: int = 8
  lr: float = 3e-3              # cosine-decayed to 5% over `steps`
  class_weight_power: float = 0.5   # loss weight of class c: freq_c ** -power (0: plain CE)
  seed: int = 0
  flip: bool = True
  ckpt_every: int = 200
  log_every: int = 50
  eval_batch: int = 32


DEMO = SegConfig()
TINY = SegConfig(widths=(16, 32), steps=40, batch_size=8, lr=1e-2, ckpt_every=20,
                 log_every=10, eval_batch=8)


# ------------------------------------------------------------------------------------ mIoU

def _check_labels(pred: Any, label: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  pred, label = np.asarray(pred), np.asarray(label)
  if pred.shape != label.shape or pred.ndim < 2:
    raise SegmenterError(f'mIoU: prediction {pred.shape} and label {label.shape} must be '
                         'integer class maps of one shape (..., H, W)')
  for name, a in (('prediction', pred), ('label', label)):
    if not np.issubdtype(a.dtype, np.integer):
      raise SegmenterError(f'mIoU: {name} has dtype {a.dtype}; expected integer class ids')
  return pred.astype(np.int64), label.astype(np.int64)


def confusion(pred: Any, label: Any, num_classes: int,
              ignore_index: int | None = None) -> np.ndarray:
  """(C, C) int64 counts, [label, prediction]. Class ids outside [0, C) (other than
  `ignore_index` in the label) are an error."""
  pred, label = _check_labels(pred, label, num_classes)
  keep = np.ones(label.shape, bool) if ignore_index is None else label != ignore_index
  p, t = pred[keep], label[keep]
  for name, a in (('prediction', p), ('label', t)):
    if a.size and (a.min() < 0 or a.max() >= num_classes):
      raise SegmenterError(f'mIoU: {name} ids span [{a.min()}, {a.max()}]; expected '
                           f'0..{num_classes - 1}')
  return np.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(
      num_classes, num_classes)


def miou_from_confusion(cm: np.ndarray) -> tuple[float, np.ndarray]:
  """(mean IoU over classes with TP + FP + FN > 0, per-class IoU with NaN for the others)."""
  cm = np.asarray(cm, np.float64)
  tp = np.diag(cm)
  union = cm.sum(0) + cm.sum(1) - tp
  if not np.any(union > 0):
    raise SegmenterError('mIoU: no pixels to score (empty input or all ignored)')
  iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
  return float(np.nanmean(iou)), iou


def miou(pred: Any, label: Any, num_classes: int, ignore_index: int | None = None) -> float:
  return miou_from_confusion(confusion(pred, label, num_classes, ignore_index))[0]


# ----------------------------------------------------------------------------------- model

class UNet(nn.Module):
  """(B, H, W, 3) images in [-1, 1] -> (B, H, W, num_classes) logits; H, W divisible by
  2 ** (len(widths) - 1)."""
  num_classes: int
  widths: Sequence[int]

  def _block(self, x, w):
    for _ in range(2):
      x = nn.Conv(w, (3, 3))(x)
      x = nn.relu(nn.GroupNorm(num_groups=min(4, w))(x))
    return x

  @nn.compact
  def __call__(self, x):
    skips = []
    for i, w in enumerate(self.widths):
      if i:
        x = nn.max_pool(x, (2, 2), (2, 2))
      x = self._block(x, w)
      skips.append(x)
    for w, s in zip(reversed(self.widths[:-1]), reversed(skips[:-1])):
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = self._block(jnp.concatenate([x, s], -1), w)
    return nn.Conv(self.num_classes, (1, 1))(x)


def _check_images(images: Any, widths: Sequence[int]) -> jnp.ndarray:
  x = jnp.asarray(images)
  f = 2 ** (len(widths) - 1)
  if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] % f or x.shape[2] % f:
    raise SegmenterError(f'segmenter: images {tuple(x.shape)}; expected (B, H, W, 3) in '
                         f'[-1, 1] with H and W divisible by {f}')
  return x.astype(jnp.float32)


# ------------------------------------------------------------------------------- the cache

def cache_key(config, seg: SegConfig) -> str:
  d = config.data
  what = {'seg': dataclasses.asdict(seg),
          'data': {k: d[k] for k in ('name', 'height', 'width', 'num_classes', 'num_train',
                                      'seed', 'manual_dir')}}
  return hashlib.sha256(json.dumps(what, sort_keys=True, default=list).encode()).hexdigest()[:16]


def path(workdir: str) -> str:
  return os.path.join(workdir, 'segmenter', FILE)


def _save(file: str, tree: Any, meta: dict) -> None:
  leaves = jax.tree_util.tree_leaves(tree)
  arrays = {f'leaf_{i}': np.asarray(x) for i, x in enumerate(leaves)}
  buf = io.BytesIO()
  np.savez(buf, meta=np.asarray(json.dumps(meta)), **arrays)
  os.makedirs(os.path.dirname(file), exist_ok=True)
  with atomic_open(file) as f:
    f.write(buf.getvalue())


def _load(file: str, template: Any) -> tuple[Any, dict]:
  with np.load(file) as z:
    meta = json.loads(str(z['meta']))
    treedef = jax.tree_util.tree_structure(template)
    leaves = [z[f'leaf_{i}'] for i in range(treedef.num_leaves)]
  shapes = [np.shape(x) for x in jax.tree_util.tree_leaves(template)]
  if [x.shape for x in leaves] != shapes:
    raise SegmenterError(f'{file}: parameter shapes do not match the segmenter settings')
  return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves]), meta


def read_meta(workdir: str) -> dict | None:
  if not os.path.exists(path(workdir)):
    return None
  with np.load(path(workdir)) as z:
    return json.loads(str(z['meta']))


# ------------------------------------------------------------------------------ segmenter

class Segmenter:
  """A trained segmenter: `predict(images) -> (B, H, W) int32`, `score(images, labels)`."""

  def __init__(self, num_classes: int, seg: SegConfig, params: Any, meta: dict | None = None):
    self.num_classes, self.seg, self.params, self.meta = num_classes, seg, params, meta or {}
    self._fn = _predict_fn(num_classes, tuple(seg.widths))

  def predict(self, images: Any) -> np.ndarray:
    x = _check_images(images, self.seg.widths)
    b, out = self.seg.eval_batch, []
    for s in range(0, x.shape[0], b):
      chunk = x[s:s + b]
      n = chunk.shape[0]
      if n < b:  # one compiled shape
        chunk = jnp.concatenate([chunk, jnp.repeat(chunk[-1:], b - n, 0)])
      out.append(np.asarray(self._fn(self.params, chunk))[:n])
    return np.concatenate(out)

  def confusion(self, images: Any, labels: Any) -> np.ndarray:
    return confusion(self.predict(images), np.asarray(labels, np.int64), self.num_classes)

  def score(self, images: Any, labels: Any) -> float:
    return miou_from_confusion(self.confusion(images, labels))[0]


def load_split(config, workdir: str, split: str, num: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """(images (N, H, W, 3) float32 in [-1, 1], labels (N, H, W) int32) of a real split."""
  from fiancee_jax import data as fdata  # noqa: PLC0415 (heavy: tfds)
  from fiancee_jax import workdir as wd  # noqa: PLC0415
  src = fdata.source(config.data, split, wd.data_dir(config, workdir))
  n = len(src) if num is None else min(num, len(src))
  rows = [src[i] for i in range(n)]
  images = np.stack([np.asarray(r['image'], np.float32) / 127.5 - 1.0 for r in rows])
  return images, np.stack([np.asarray(r['label'], np.int32) for r in rows])


def _batch(images: np.ndarray, labels: np.ndarray, seg: SegConfig, step: int):
  rng = np.random.default_rng([seg.seed, step])
  idx = rng.choice(len(images), size=min(seg.batch_size, len(images)), replace=False)
  x, y = images[idx], labels[idx]
  if seg.flip:
    f = rng.random(len(idx)) < 0.5
    x = np.where(f[:, None, None, None], x[:, :, ::-1], x)
    y = np.where(f[:, None, None], y[:, :, ::-1], y)
  return jnp.asarray(x), jnp.asarray(y)


def class_weights(labels: np.ndarray, num_classes: int, power: float) -> np.ndarray:
  """(C,) loss weights freq_c ** -power over the train labels (absent classes: 0), scaled to
  a pixel-weighted mean of 1, so rare classes (poles, signs, riders) count for more."""
  freq = np.bincount(labels.ravel(), minlength=num_classes).astype(np.float64)
  freq /= freq.sum()
  w = np.where(freq > 0, np.maximum(freq, 1e-12) ** -power, 0.0)
  return (w / np.sum(w * freq)).astype(np.float32)


def _optimizer(seg: SegConfig):
  return optax.adam(optax.cosine_decay_schedule(seg.lr, seg.steps, alpha=0.05))


@functools.lru_cache(maxsize=8)
def _step_fn(nc: int, seg: SegConfig):
  """The jitted train step (one compile per settings in a process)."""
  model, opt = UNet(nc, seg.widths), _optimizer(seg)

  def loss_fn(p, x, y, weights):
    logits = model.apply(p, x)
    w = weights[y]
    loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y) * w) / jnp.sum(w)
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)

  @jax.jit
  def step_fn(state, x, y, weights):
    p, o = state
    (loss, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, y, weights)
    upd, o = opt.update(g, o, p)
    return (optax.apply_updates(p, upd), o), loss, acc
  return step_fn


@functools.lru_cache(maxsize=8)
def _predict_fn(nc: int, widths: tuple[int, ...]):
  model = UNet(nc, widths)
  return jax.jit(lambda p, x: jnp.argmax(model.apply(p, x), -1).astype(jnp.int32))


def train(config, workdir: str, seg: SegConfig = DEMO, *, log=_print) -> Segmenter:
  """Train on the real train split (resuming `<workdir>/segmenter/` when it holds an
  unfinished run with the same cache key), save, return the segmenter. Progress lines go to
  `log`; the finished checkpoint's meta carries the train-image mIoU and the time."""
  nc = int(config.data.num_classes)
  images, labels = load_split(config, workdir, 'train')
  _check_images(images[:1], seg.widths)
  model = UNet(nc, seg.widths)
  params = model.init(jax.random.PRNGKey(seg.seed), jnp.asarray(images[:1]))
  opt = _optimizer(seg)
  state = (params, opt.init(params))
  key, file, start = cache_key(config, seg), path(workdir), 0
  meta = {'key': key, 'step': 0, 'steps': seg.steps, 'seconds': 0.0,
          'seg': dataclasses.asdict(seg), 'num_classes': nc}
  if os.path.exists(file):
    old = read_meta(workdir)
    if old.get('key') == key:
      state, meta = _load(file, state)
      start = int(meta['step'])
      log(f'segmenter: resuming {file} at step {start}/{seg.steps}')
    else:
      log(f'segmenter: {file} was trained with other settings (key {old.get("key")} != '
          f'{key}); training again')

  weights = jnp.asarray(class_weights(labels, nc, seg.class_weight_power))
  step_fn = _step_fn(nc, seg)

  t0, spent, last = time.time(), float(meta.get('seconds', 0.0)), None
  for step in range(start + 1, seg.steps + 1):
    state, loss, acc = step_fn(state, *_batch(images, labels, seg, step), weights)
    if step % seg.log_every == 0 or step == seg.steps:
      el = time.time() - t0
      rate = (step - start) / max(el, 1e-9)
      log(f'segmenter step {step}/{seg.steps} loss {float(loss):.4f} pixel_acc '
          f'{float(acc):.3f} {rate:.2f} steps/s ETA {(seg.steps - step) / rate:.0f} s')
    if step % seg.ckpt_every == 0 or step == seg.steps:
      last = float(loss)
      meta.update(step=step, seconds=spent + time.time() - t0, train_loss=last)
      _save(file, state, meta)
  s = Segmenter(nc, seg, state[0], meta)
  if start < seg.steps:
    n = min(len(images), 200)
    meta['train_miou'], meta['train_miou_n'] = s.score(images[:n], labels[:n]), n
    _save(file, state, meta)
    log(f'segmenter: mIoU on {n} of its train images {meta["train_miou"]:.4f}, '
        f'{meta["seconds"]:.0f} s of training -> {file}')
  return s


def load(config, workdir: str, seg: SegConfig = DEMO) -> Segmenter:
  """The finished segmenter of `workdir`; SegmenterError when missing, unfinished or trained
  with other settings."""
  file, key = path(workdir), cache_key(config, seg)
  meta = read_meta(workdir)
  if meta is None or meta.get('key') != key or meta.get('step') != seg.steps:
    raise SegmenterError(f'{file}: no finished segmenter with these settings (key {key}); '
                         'train it: python -m fiancee_jax.metrics.segmenter --config ... '
                         f'--workdir {workdir}')
  nc = int(config.data.num_classes)
  model = UNet(nc, seg.widths)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, config.data.height,
                                                        config.data.width, 3)))
  opt = _optimizer(seg)
  state, meta = _load(file, (params, opt.init(params)))
  return Segmenter(nc, seg, state[0], meta)


def ensure(config, workdir: str, seg: SegConfig = DEMO, *, log=_print) -> Segmenter:
  """Load the cached segmenter, training (or finishing) it first when needed."""
  try:
    return load(config, workdir, seg)
  except SegmenterError:
    return train(config, workdir, seg, log=log)


def ceiling(config, workdir: str, segmenter: Segmenter, split: str = 'test') -> dict:
  """mIoU of the segmenter on the real images of `split` (the ceiling of generated ones)."""
  images, labels = load_split(config, workdir, split)
  m, iou = miou_from_confusion(segmenter.confusion(images, labels))
  return {'miou': m, 'n': len(images), 'split': split,
          'classes_scored': int(np.sum(~np.isnan(iou)))}


def main(argv: Sequence[str] | None = None) -> None:
  from fiancee_jax import config as cfg  # noqa: PLC0415
  from fiancee_jax.infer.engine import device_name  # noqa: PLC0415
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', required=True, help='configs/<name>.py[:arg]')
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--tiny', action='store_true', help='the test-suite settings (TINY)')
  ap.add_argument('--steps', type=int, default=None, help='override SegConfig.steps')
  a = ap.parse_args(argv)
  config = cfg.load(a.config)
  seg = TINY if a.tiny else DEMO
  if a.steps is not None:
    seg = dataclasses.replace(seg, steps=a.steps)
  s = ensure(config, a.workdir, seg)
  print(json.dumps({'name': 'segmenter_ceiling', **ceiling(config, a.workdir, s),
                    'train_miou': s.meta.get('train_miou'), 'steps': seg.steps,
                    'train_seconds': s.meta.get('seconds'), 'device': device_name()}),
        flush=True)


if __name__ == '__main__':
  main()

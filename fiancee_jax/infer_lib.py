"""Inference with early exits: one input (`infer_file`) and the threshold sweep (`sweep`).

One input (Sec. 3.2): backbone prefix -> predictor -> the cheapest exit whose predicted LPIPS
(+ the conformal offset, when asked) is <= the threshold -> that route, all in one jitted
function (`routing.routed_apply`, `lax.switch` runs only the chosen route). OASIS: label map +
noise; head avatars (Sec. 4.2): a (source, driver) pair and the source identity, whose frame
bank guides the branches (the predictor reads the driver's motion key).

Sweep (Sec. 4.1 / 4.2, OASIS Figs. 3, 4, 8, 9; head avatars Figs. 5, 6, 7, 10): over the
predictor's test split and a range of thresholds: exit distribution, mean GMACs, realised
LPIPS and violation rate (paper rule and conformal offset calibrated on the calibration
split), the GFLOPs/LPIPS gain (Sec. 3.4), and wall-clock latency of every route and of routed
batched inference vs the backbone, measured in the same run. `report.write` turns the result
into `<workdir>/report/`.

One skeleton serves both backbones: `_jitted` builds the same set of jitted functions,
`fn(params, *inputs)` with inputs = (labels, z) for OASIS or (source, driver, identity) for
head avatars (`fiancee_heads.route_fns` / `routed_one`), and `_sweep_inputs` reads the test
rows' inputs. Route functions recompute the prefix that the predictor already ran (OASIS:
first conv + ResBlock 1; heads: the encoders); its measured cost is reported
(`overhead.prefix_ms`).
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fiancee_jax import config as cfg
from fiancee_jax.core import routing
from fiancee_jax.train import predictor as tp
from fiancee_jax.errors import FianceeError

PyTree = Any
TARGET_LPIPS = 0.1   # the headline quality (issue: mean LPIPS <= 0.1)


class InferError(FianceeError):
  """Bad user input to inference: one clear message."""


# ---------------------------------------------------------------------------------------------
# Inputs.


# LPIPS (VGG16, as here) between images in [-1, 1] stays below ~1 in practice (unrelated
# natural images score ~0.7): a threshold above 1 sends every input to the cheapest exit, so a
# larger value is a typo (10 for 0.10, 1e9), not a request.
MAX_THRESHOLD = 1.0


def check_threshold(threshold: Any, flag: str = 'threshold') -> float:
  """A finite LPIPS threshold in (0, MAX_THRESHOLD], else InferError naming --flag."""
  try:
    t = float(threshold)
  except (TypeError, ValueError):
    raise InferError(f'--{flag}={threshold!r}: not a number; expected an LPIPS value in '
                     f'(0, {MAX_THRESHOLD:g}] (e.g. 0.1)') from None
  if not math.isfinite(t) or not 0 < t <= MAX_THRESHOLD:
    raise InferError(f'--{flag}={threshold!r}: expected a finite LPIPS value in '
                     f'(0, {MAX_THRESHOLD:g}] (e.g. 0.1)')
  return t


def _open_image(path: str, flag: str, what: str, check: Callable | None = None,
                mode: str | None = None) -> np.ndarray:
  """Pixels of an image file (converted to `mode` when given); one InferError naming --flag
  for a missing path, a directory, an empty or undecodable file. `check(im)` sees the opened
  file (format, mode) before its pixels are decoded."""
  from PIL import Image  # noqa: PLC0415
  if os.path.isdir(path):
    raise InferError(f'--{flag}={path!r}: a directory; expected {what}')
  if not os.path.isfile(path):
    raise InferError(f'--{flag}={path!r}: no such file; expected {what}')
  if os.path.getsize(path) == 0:
    raise InferError(f'--{flag}={path!r}: empty file (0 bytes); expected {what}')
  try:
    im = Image.open(path)
  except Exception as e:  # noqa: BLE001 - PIL raises many types for a file it cannot identify
    raise InferError(f'--{flag}={path!r}: not an image file PIL can identify; expected '
                     f'{what}') from e
  with im:
    if check is not None:
      check(im)
    try:
      im.load()
    except Exception as e:  # noqa: BLE001 - truncated / corrupt data: OSError, SyntaxError, ...
      raise InferError(f'--{flag}={path!r}: cannot decode this {im.format} file ({e}); '
                       f'expected {what}') from None
    return np.asarray(im if mode is None else im.convert(mode))


def _check_size(arr: np.ndarray, flag: str, path: str, config: ml_collections.ConfigDict,
                what: str = '') -> None:
  d = config.data
  if arr.shape[:2] != (d.height, d.width):
    raise InferError(f'--{flag}={path!r}: size {arr.shape[0]}x{arr.shape[1]} (HxW); the model '
                     f'expects {d.height}x{d.width}{what}')


LABEL_PNG = 'an 8-bit single-channel PNG of label ids (mode L, e.g. Cityscapes *_labelIds.png)'


def _check_label_file(im: Any, path: str) -> None:
  """Refuse label files whose pixels are not label ids, before decoding them.

  Accepted: PNG of mode L (Cityscapes' *_labelIds.png), or RGB/RGBA whose channels are equal
  (a grey label map saved as colour; checked on the pixels). Refused:
  - other formats: JPEG's lossy compression changes the ids along region borders;
  - 16/32-bit PNGs: Cityscapes' 16-bit *_instanceIds.png hold label id x 1000 + instance;
  - palette PNGs (mode P): the pixels are palette indices, and whether they are class ids
    depends on the tool that wrote the file (VOC-style label tools make them ids, an image
    quantised to a palette - a colour-coded map re-saved by an editor - does not); the file
    cannot tell, and reading wrong ids would draw a wrong scene without a word. The message
    says how to re-save a palette PNG whose indices are the ids.
  """
  where = f'--label={path!r}'
  if im.format != 'PNG':
    why = ' (JPEG compression changes the ids along region borders)' if im.format == 'JPEG' else ''
    raise InferError(f'{where}: a {im.format} file{why}; expected {LABEL_PNG}')
  if im.mode == 'P':
    raise InferError(f'{where}: palette PNG (mode P): its pixels are palette indices, not '
                     f'necessarily class ids; expected {LABEL_PNG} (if the indices are the '
                     'ids, re-save as mode L: Image.fromarray(np.asarray(Image.open(f))))')
  if im.mode.startswith(('I', 'F')):
    bits = '16-bit' if '16' in im.mode else '32-bit'
    raise InferError(f'{where}: {bits} PNG (mode {im.mode}); expected {LABEL_PNG} '
                     "(Cityscapes' 16-bit *_instanceIds.png hold instance ids, not label ids)")
  if im.mode not in ('L', 'RGB', 'RGBA'):
    raise InferError(f'{where}: PNG of mode {im.mode}; expected {LABEL_PNG}')


def read_label(path: str, config: ml_collections.ConfigDict) -> np.ndarray:
  """A label-id PNG (single channel, values = class ids) -> (H, W) int32, checked against
  the config's resolution and number of classes (`_check_label_file` says which files are
  refused and why)."""
  d = config.data
  arr = _open_image(path, 'label', LABEL_PNG,
                    check=functools.partial(_check_label_file, path=path))
  if arr.ndim == 3:
    if np.all(arr[..., :3] == arr[..., :1]):
      arr = arr[..., 0]
    else:
      raise InferError(f'--label={path!r}: colour image (mode RGB{"A" * (arr.shape[2] == 4)}, '
                       f'channels differ: a colour-coded map?); expected {LABEL_PNG}')
  _check_size(arr, 'label', path, config)
  bad = np.unique(arr[(arr < 0) | (arr >= d.num_classes)])
  if bad.size:
    raise InferError(f'--label={path!r}: unknown class ids {bad[:10].tolist()}; expected ids in '
                     f'[0, {d.num_classes})')
  return arr.astype(np.int32)


def dataset_label(config: ml_collections.ConfigDict, workdir: str, split: str,
                  index: int) -> np.ndarray:
  """Label map `index` of a prepared data split, (H, W) int32."""
  from fiancee_jax import data  # noqa: PLC0415
  src = data.source(config.data, split, cfg.data_dir(config, workdir))
  if not 0 <= index < len(src):
    raise InferError(f'--index={index}: the {split!r} split has {len(src)} examples')
  return np.asarray(src[index]['label'], np.int32)


def noise(config: ml_collections.ConfigDict, seed: int) -> np.ndarray:
  """z (z_dim,) drawn from `seed` (the same seed gives the same image)."""
  return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (config.model.z_dim,)),
                    np.float32)


def is_heads(config: ml_collections.ConfigDict) -> bool:
  """True for a head-avatar (MegaPortraits) config, False for OASIS."""
  return config.backbone == 'megaportraits'


def load(config: ml_collections.ConfigDict, workdir: str,
         stages: Sequence[str] = ('backbone', 'bank', 'branches', 'predictor'),
         identities: Sequence[int] | None = None) -> Any:
  """The trained pipeline; a missing stage ends in one error naming the command to run.
  Head avatars: the frame banks of `identities` only (default every identity of the data)."""
  from fiancee_jax import fiancee  # noqa: PLC0415
  if not os.path.isdir(workdir):
    raise InferError(f'--workdir={workdir!r} does not exist: run the stages first '
                     '(train.py --stage=backbone, build_bank.py, train.py --stage=branches, '
                     'train.py --stage=predictor)')
  if identities is not None and is_heads(config):
    from fiancee_jax import fiancee_heads  # noqa: PLC0415
    return fiancee_heads.load_pipeline(config, workdir, stages=tuple(stages),
                                       identities=identities)
  return fiancee.load_pipeline(config, workdir, stages=tuple(stages))


# ---------------------------------------------------------------------------------------------
# Inputs (head avatars): a (source, driver) pair and the source identity.


def read_image(path: str, config: ml_collections.ConfigDict, flag: str) -> np.ndarray:
  """An RGB PNG/JPEG of the config's resolution -> (H, W, 3) uint8 (alpha dropped, grey
  expanded); one InferError naming `flag` for a missing, unreadable or wrongly sized file."""
  arr = _open_image(path, flag, 'an RGB image', mode='RGB')
  _check_size(arr, flag, path, config, ' RGB')
  return arr.astype(np.uint8)


def split_frames(config: ml_collections.ConfigDict, workdir: str, split: str,
                 indices: Sequence[int], flag: str = 'index'
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """(images (N, H, W, 3) uint8, identities (N,) int32, ground-truth poses (N, 3) degrees or
  None when the data has none) of examples `indices` of a prepared head-avatar split."""
  from fiancee_jax import data  # noqa: PLC0415
  src = data.source(config.data, split, cfg.data_dir(config, workdir))
  bad = [int(i) for i in indices if not 0 <= int(i) < len(src)]
  if bad:
    raise InferError(f'--{flag}={bad[0]}: the {split!r} split has {len(src)} examples')
  uniq, inv = np.unique(np.asarray(indices, np.int64), return_inverse=True)
  ex = [src[int(i)] for i in uniq]
  images = np.stack([np.asarray(e['image'], np.uint8) for e in ex])[inv]
  ids = np.array([int(e['identity']) for e in ex], np.int32)[inv]
  pose = (np.stack([np.asarray(e['pose'], np.float32) for e in ex])[inv]
          if all('pose' in e for e in ex) else None)
  return images, ids, pose


def to_pm1(images: np.ndarray) -> np.ndarray:
  """uint8 images -> float32 in [-1, 1] (the models' range)."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


def pair_inputs(config: ml_collections.ConfigDict, workdir: str, *, source: str | None,
                driver: str | None, source_index: int | None, driver_index: int | None,
                identity: int | None, split: str = 'test'
                ) -> tuple[np.ndarray, np.ndarray, int, str]:
  """(source, driver (H, W, 3) uint8, source identity, name) of one head-avatar input.

  Each image is a file (--source / --driver) or an example of the --split data split
  (--source_index / --driver_index). The source identity picks the frame bank: a dataset
  source brings its own; a source file needs --identity (whose bank `build_bank.py` built).
  """
  if (source is None) == (source_index is None):
    raise InferError('give exactly one of --source (an RGB image) or --source_index (a data '
                     'split index)')
  if (driver is None) == (driver_index is None):
    raise InferError('give exactly one of --driver (an RGB image) or --driver_index (a data '
                     'split index)')
  if source is not None:
    if identity is None:
      raise InferError(f'--source={source!r} needs --identity=N: the source identity whose '
                       'frame bank guides the branches (or use --source_index)')
    src_img, ident = read_image(source, config, 'source'), int(identity)
    s_name = os.path.splitext(os.path.basename(source))[0]
  else:
    imgs, ids, _ = split_frames(config, workdir, split, [source_index], 'source_index')
    src_img, ident, s_name = imgs[0], int(ids[0]), f'{split}{int(source_index)}'
    if identity is not None and int(identity) != ident:
      raise InferError(f'--identity={identity} but --source_index={source_index} is a frame of '
                       f'identity {ident}: drop --identity')
  if driver is not None:
    drv_img = read_image(driver, config, 'driver')
    d_name = os.path.splitext(os.path.basename(driver))[0]
  else:
    drv_img = split_frames(config, workdir, split, [driver_index], 'driver_index')[0][0]
    d_name = f'{split}{int(driver_index)}'
  return src_img, drv_img, ident, f'{s_name}_by_{d_name}'


def check_identity(config: ml_collections.ConfigDict, workdir: str, identity: int) -> None:
  """An identity of the data (every one has a frame bank), else InferError listing them."""
  from fiancee_jax import fiancee_heads  # noqa: PLC0415
  ids = fiancee_heads.all_identities(config, cfg.data_dir(config, workdir))
  if int(identity) not in ids:
    raise InferError(f'--identity={identity}: expected an identity of the {config.data.name} '
                     f'data with a frame bank, one of {ids}')


# ---------------------------------------------------------------------------------------------
# Jitted pieces (built once per pipeline; params stay jit arguments).


def _predictor_of(pipeline: Any) -> Callable:
  # params['predictor'] holds the predictor's variables ({'params': ...}, fiancee.py).
  return lambda params, feats: pipeline.predictor.apply(params['predictor'], feats['block1'])


def _oasis_fns(pipeline: Any) -> dict[str, Any]:
  """OASIS: inputs (labels (B, H, W) ids, z (B, z_dim))."""
  from fiancee_jax import fiancee  # noqa: PLC0415
  n_cls = pipeline.config.data.num_classes
  routes = fiancee.route_fns(pipeline)
  predict = _predictor_of(pipeline)

  def onehot(labels):
    return jax.nn.one_hot(labels, n_cls, dtype=jnp.float32)

  def predict_fn(params, labels, z):
    _, feats = fiancee.prefix(pipeline, params, onehot(labels), z)
    return predict(params, feats)

  def prefix_fn(params, labels, z):
    return fiancee.prefix(pipeline, params, onehot(labels), z)[1]['block1']

  def guide_fn(params, labels, z):
    seg = onehot(labels)
    return fiancee.guide(pipeline, params, fiancee.prefix(pipeline, params, seg, z)[1], seg)

  def routed_one(params, labels, z, threshold, costs, offset):
    def pre(p, x):
      _, feats = fiancee.prefix(pipeline, p, onehot(x[0]), x[1])
      return x, feats

    exit_fns = tuple((lambda p, f, r=r: r(p, onehot(f[0][0]), f[0][1])) for r in routes)
    return routing.routed_apply(pre, lambda p, f: predict(p, f[1])[0], exit_fns, params,
                                (labels, z), threshold, costs, offset)

  def all_fn(params, labels, z):
    return fiancee.all_images(pipeline, params, onehot(labels), z)

  return {'predict': predict_fn, 'prefix': prefix_fn, 'guide': guide_fn,
          'routed_one': routed_one, 'all_images': all_fn,
          'routes': [lambda params, labels, z, r=r: r(params, onehot(labels), z)
                     for r in routes]}


def _heads_fns(pipeline: Any) -> dict[str, Any]:
  """Head avatars: inputs (source, driver (B, H, W, 3) in [-1, 1], source identity (B,))."""
  from fiancee_jax import fiancee_heads as fh  # noqa: PLC0415

  def encode(params, source, driver, identity):
    return pipeline.generator.apply(params['generator'], source, driver, False,
                                    method='encode')[0]

  return {'predict': lambda params, source, driver, identity: fh.predict_lpips(
              pipeline, params, driver),
          'prefix': encode,
          'guide': functools.partial(fh.front_end, pipeline),
          'routed_one': functools.partial(fh.routed_one, pipeline),
          'all_images': functools.partial(fh.all_images, pipeline),
          'routes': fh.route_fns(pipeline)}


_JIT_CACHE: dict[int, tuple[Any, dict]] = {}


def _jitted(pipeline: Any) -> dict[str, Any]:
  """Jitted functions of a pipeline, `fn(params, *inputs)`, built once per pipeline object
  (kept by id): 'predict' -> (B, E), 'prefix', 'guide' (prefix + bank retrieval),
  'routed_one' (+ threshold, costs, offset), 'all' (every route's image, route order, in one
  pass), 'all_images' (the same as a dict, + 'frame' / 'motion' for head avatars), 'routes'."""
  hit = _JIT_CACHE.get(id(pipeline))
  if hit is not None and hit[0] is pipeline:
    return hit[1]
  raw = (_heads_fns if is_heads(pipeline.config) else _oasis_fns)(pipeline)
  order = list(pipeline.exits) + ['backbone']
  all_images = raw['all_images']

  def all_fn(params, *inputs):  # a list in route order (int and str dict keys do not sort)
    imgs = all_images(params, *inputs)
    return [imgs[k] for k in order]

  fns = {k: jax.jit(v) for k, v in raw.items() if k != 'routes'}
  fns['all'] = jax.jit(all_fn)
  fns['routes'] = [jax.jit(r) for r in raw['routes']]
  _JIT_CACHE.clear()  # one pipeline at a time: do not hold old params alive
  _JIT_CACHE[id(pipeline)] = (pipeline, fns)
  return fns


def _block(x: Any) -> Any:
  return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, 'block_until_ready')
                                else a, x)


def time_fn(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
  """Median wall-clock seconds of fn() (outputs blocked on), after `warmup` calls."""
  for _ in range(warmup):
    _block(fn())
  times = []
  for _ in range(max(repeats, 1)):
    t0 = time.perf_counter()
    _block(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def device_name() -> str:
  d = jax.devices()[0]
  kind = getattr(d, 'device_kind', d.platform)
  return f'{d.platform}:{kind} ({platform.processor() or platform.machine()}, ' \
         f'{os.cpu_count()} cpus)' if d.platform == 'cpu' else f'{d.platform}:{kind}'


# ---------------------------------------------------------------------------------------------
# One input.


def route_one(pipeline: Any, inputs: Sequence[Any], threshold: float, *, offset: float = 0.0,
              verify: bool = False, repeats: int = 5) -> tuple[np.ndarray, dict[str, Any]]:
  """Route one input (`inputs` = the jitted functions' inputs with batch 1, see `_jitted`);
  returns (image (H, W, 3) in [-1, 1], info: exit (block index or 'backbone'), route index,
  predicted LPIPS of every exit and of the chosen one, GMACs (and share of the backbone),
  latency (median of `repeats` after warm-up), and with `verify` the true LPIPS of the chosen
  route against the backbone image)."""
  t = check_threshold(threshold)
  fns = _jitted(pipeline)
  params = pipeline.params
  costs = jnp.asarray(pipeline.costs, jnp.float32)
  run = lambda: fns['routed_one'](params, *inputs, jnp.float32(t), costs, jnp.float32(offset))
  latency = time_fn(run, repeats)
  image, aux = run()
  route = int(aux['exit'])
  pred = np.asarray(aux['pred_lpips'], np.float64)
  exits = list(pipeline.exits)
  info: dict[str, Any] = {
      'threshold': t, 'offset': float(offset), 'route': route,
      'exit': int(exits[route]) if route < len(exits) else 'backbone',
      'pred_lpips': {f'exit{k}': float(v) for k, v in zip(exits, pred)},
      'pred_lpips_chosen': float(pred[route]) if route < len(exits) else 0.0,
      'gmacs': float(pipeline.costs[route]),
      'gmacs_share': float(pipeline.costs[route] / pipeline.costs[-1]),
      'latency_ms': 1e3 * latency, 'device': device_name()}
  if verify:
    from fiancee_jax.metrics import lpips as lpips_lib  # noqa: PLC0415
    imgs = fns['all'](params, *inputs)
    ref, lp = imgs[-1], lpips_lib.load()
    info['true_lpips'] = 0.0 if route == len(exits) else float(lp(jnp.asarray(image), ref)[0])
    info['true_lpips_all'] = {f'exit{k}': float(lp(imgs[e], ref)[0])
                              for e, k in enumerate(exits)}
  return np.asarray(image[0]), info


def infer_one(pipeline: Any, labels: np.ndarray, z: np.ndarray, threshold: float, *,
              offset: float = 0.0, verify: bool = False, repeats: int = 5
              ) -> tuple[np.ndarray, dict[str, Any]]:
  """OASIS: route one label map (H, W) ids with noise z (z_dim,) (see `route_one`)."""
  inputs = (jnp.asarray(labels[None], jnp.int32), jnp.asarray(z[None], jnp.float32))
  return route_one(pipeline, inputs, threshold, offset=offset, verify=verify, repeats=repeats)


def infer_pair(pipeline: Any, source: np.ndarray, driver: np.ndarray, identity: int,
               threshold: float, *, offset: float = 0.0, verify: bool = False,
               repeats: int = 5) -> tuple[np.ndarray, dict[str, Any]]:
  """Head avatars: route one (source, driver) pair of uint8 (H, W, 3) images, guided by the
  frame bank of the source `identity` (see `route_one`)."""
  inputs = (jnp.asarray(to_pm1(source[None])), jnp.asarray(to_pm1(driver[None])),
            jnp.asarray([identity], jnp.int32))
  return route_one(pipeline, inputs, threshold, offset=offset, verify=verify, repeats=repeats)


def _write_image(out: str, image: np.ndarray) -> None:
  from fiancee_jax.train import logging as tlog  # noqa: PLC0415
  tlog.write_png(out, tlog.to_uint8(image))


def infer_file(config: ml_collections.ConfigDict, workdir: str, *, label: str | None = None,
               index: int | None = None, split: str = 'test', noise_seed: int = 0,
               threshold: float = TARGET_LPIPS, offset: float = 0.0, verify: bool = False,
               out: str | None = None, repeats: int = 5, pipeline: Any = None,
               source: str | None = None, driver: str | None = None,
               source_index: int | None = None, driver_index: int | None = None,
               identity: int | None = None) -> dict[str, Any]:
  """`infer.py` for one input -> writes the image (default `<workdir>/infer/<name>_...png`)
  and returns the info dict (with `image` = the written path). OASIS: a label PNG (or a data
  split index) + a noise seed; head avatars: source and driver (files or split indices) +
  the source identity (`pair_inputs`). Inputs are checked before any stage is loaded."""
  t = check_threshold(threshold)
  if is_heads(config):
    if label is not None or index is not None:
      raise InferError(f'{config.name} is a head-avatar config: give --source/--source_index '
                       'and --driver/--driver_index, not --label/--index')
    return _infer_pair_file(config, workdir, source=source, driver=driver,
                            source_index=source_index, driver_index=driver_index,
                            identity=identity, split=split, threshold=t, offset=offset,
                            verify=verify, out=out, repeats=repeats, pipeline=pipeline)
  if any(v is not None for v in (source, driver, source_index, driver_index, identity)):
    raise InferError(f'{config.name} is an OASIS config: give --label or --index, not the '
                     'head-avatar flags (--source, --driver, --identity, ...)')
  if (label is None) == (index is None):
    raise InferError('give exactly one of --label (a label-id PNG) or --index (a data split '
                     'index)')
  if label is not None:
    labels = read_label(label, config)
    name = os.path.splitext(os.path.basename(label))[0]
  else:
    labels = dataset_label(config, workdir, split, int(index))
    name = f'{split}{int(index)}'
  pipeline = pipeline or load(config, workdir)
  image, info = infer_one(pipeline, labels, noise(config, noise_seed), t, offset=offset,
                          verify=verify, repeats=repeats)
  out = out or os.path.join(os.path.abspath(workdir), 'infer', f'{name}_s{noise_seed}_t{t:g}.png')
  _write_image(out, image)
  info.update(image=out, noise_seed=int(noise_seed), input=label or f'{split}[{index}]')
  return info


def _infer_pair_file(config, workdir, *, source, driver, source_index, driver_index, identity,
                     split, threshold, offset, verify, out, repeats, pipeline) -> dict[str, Any]:
  src, drv, ident, name = pair_inputs(config, workdir, source=source, driver=driver,
                                      source_index=source_index, driver_index=driver_index,
                                      identity=identity, split=split)
  if pipeline is None:
    check_identity(config, workdir, ident)
    pipeline = load(config, workdir, identities=[ident])
  image, info = infer_pair(pipeline, src, drv, ident, threshold, offset=offset, verify=verify,
                           repeats=repeats)
  out = out or os.path.join(os.path.abspath(workdir), 'infer', f'{name}_t{threshold:g}.png')
  _write_image(out, image)
  info.update(image=out, identity=ident,
              source=source or f'{split}[{source_index}]',
              driver=driver or f'{split}[{driver_index}]')
  return info


# ---------------------------------------------------------------------------------------------
# Batched routed inference.


def routed_rows(pipeline: Any, inputs: Sequence[Any], threshold: float, offset: float = 0.0,
                bucket_sizes: Sequence[int] | None = None,
                timings: dict[str, float] | None = None) -> tuple[jax.Array, np.ndarray]:
  """A batch (`inputs` = the jitted functions' inputs, leading axis B): predictor once for
  the batch, exits on the host, then each route on its bucket (`routing.run_bucketed`).
  Returns (images (B, H, W, 3), exits (B,)). With `timings`, adds the seconds spent in
  prediction ('predict') and in route calls ('routes')."""
  fns = _jitted(pipeline)
  params = pipeline.params
  sizes = tuple(bucket_sizes or pipeline.config.routing.bucket_sizes)
  inputs = tuple(jnp.asarray(x) for x in inputs)
  t0 = time.perf_counter()
  pred = np.asarray(fns['predict'](params, *inputs))
  t1 = time.perf_counter()
  exits = np.asarray(routing.choose_exit(pred, threshold, pipeline.costs, offset))
  spent = [0.0]

  def wrap(r):
    def call(x):
      s = time.perf_counter()
      out = _block(r(params, *x))
      spent[0] += time.perf_counter() - s
      return out
    return call

  images = routing.run_bucketed([wrap(r) for r in fns['routes']], exits, inputs, sizes)
  if timings is not None:
    timings['predict'] = timings.get('predict', 0.0) + (t1 - t0)
    timings['routes'] = timings.get('routes', 0.0) + spent[0]
  return images, exits


def routed_batch(pipeline: Any, labels: np.ndarray, z: np.ndarray, threshold: float,
                 offset: float = 0.0, bucket_sizes: Sequence[int] | None = None,
                 timings: dict[str, float] | None = None) -> tuple[jax.Array, np.ndarray]:
  """OASIS `routed_rows` on label maps (B, H, W) and noises (B, z_dim)."""
  return routed_rows(pipeline, (labels, z), threshold, offset, bucket_sizes, timings)


# ---------------------------------------------------------------------------------------------
# Sweep.


def _sweep_inputs(config, workdir, rows) -> tuple[tuple[np.ndarray, ...], dict[str, Any]]:
  """Inputs of the predictor split's rows for the jitted functions (OASIS: labels, z; head
  avatars: source, driver in [-1, 1], source identity) and, for head avatars, the driver's
  ground-truth pose (None when the data has none)."""
  if not is_heads(config):
    uniq, inv = np.unique(rows['maps'], return_inverse=True)
    return (tp.load_labels(config, workdir, rows['data_split'], uniq)[inv], rows['z']), {}
  n = len(rows['sources'])
  images, ids, pose = split_frames(config, workdir, rows['data_split'],
                                   np.concatenate([rows['sources'], rows['drivers']]))
  inputs = (to_pm1(images[:n]), to_pm1(images[n:]), ids[:n])
  return inputs, {'driver_pose': None if pose is None else pose[n:]}


def rotation_data(pipeline: Any, rows: dict[str, Any], identity: np.ndarray,
                  driver_pose: np.ndarray | None, exits_taken: np.ndarray) -> dict[str, Any]:
  """Fig. 10 inputs for head-avatar test rows: the driver's head rotation from frontal
  (ground-truth pose where the data has it, else the motion encoder's angles), the angle
  between the driver's key and the guiding bank frame's key (the motion encoder's angles of
  both), each exit's true LPIPS and the route each row took."""
  from fiancee_jax import fiancee_heads  # noqa: PLC0415
  motion = np.asarray(rows['feats'], np.float32)
  gt = driver_pose is not None
  out = {'angle_source': 'ground-truth pose' if gt else 'motion encoder angles',
         'driver_angle': fiancee_heads.rotation_angle(driver_pose if gt else motion[:, :3]),
         'exits_taken': np.asarray(exits_taken).tolist(), 'key_angle': None}
  if pipeline.use_bank and pipeline.params.get('bank') is not None:
    keys = fiancee_heads.nearest_bank_keys(pipeline, motion, identity)
    out['key_angle'] = fiancee_heads.rotation_angle(motion[:, :3], keys[:, :3])
  return out


def measure_latency(pipeline: Any, inputs: Sequence[np.ndarray], batch_size: int,
                    repeats: int, threshold: float, offset: float) -> dict[str, Any]:
  """Wall-clock of every route, the backbone and routed batched inference (`routed_rows`) on
  the same batches in one run, + the batch-1 routing overhead (prefix, predictor, retrieval)
  against the cheapest route."""
  fns = _jitted(pipeline)
  params = pipeline.params
  costs = np.asarray(pipeline.costs, np.float64)
  exits = list(pipeline.exits)
  n, bs = len(inputs[0]), int(batch_size)
  batches = [tuple(x[i:i + bs] for x in inputs) for i in range(0, n - bs + 1, bs)] or \
      [tuple(x[:bs] for x in inputs)]
  print(f'[sweep] latency: {len(batches)} batch(es) of {bs}, median of {repeats} runs, '
        f'threshold {threshold} (calibrated offset {offset:.4f})', flush=True)
  route_ms = [1e3 * time_fn(lambda fn=fn: fn(params, *batches[0]), repeats) / bs
              for fn in fns['routes']]
  backbone_s = time_fn(lambda: [fns['routes'][-1](params, *b) for b in batches], repeats)
  for b in batches:  # warm every bucket shape first
    routed_rows(pipeline, b, threshold, offset)
  routed_times, parts = [], []
  for _ in range(max(repeats, 1)):
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    for b in batches:
      routed_rows(pipeline, b, threshold, offset, timings=timings)
    routed_times.append(time.perf_counter() - t0)
    parts.append(timings)
  routed_s = statistics.median(routed_times)
  mid = parts[int(np.argsort(routed_times)[len(routed_times) // 2])]
  one = tuple(x[:1] for x in inputs)
  cheapest = int(np.argmin(costs))
  t1 = {name: time_fn(lambda fn=fn: fn(params, *one), max(repeats, 5)) for name, fn in
        (('cheap', fns['routes'][cheapest]), ('pred', fns['predict']), ('guide', fns['guide']),
         ('prefix', fns['prefix']))}
  n_run = bs * len(batches)
  lat = {
      'batch_size': bs, 'num_images': n_run, 'repeats': repeats,
      'per_route_ms_per_image': route_ms,
      'backbone_ms_per_image': 1e3 * backbone_s / n_run,
      'routed_ms_per_image': 1e3 * routed_s / n_run,
      'speedup': backbone_s / routed_s,
      'routed_parts_ms_per_image': {
          'prefix_and_predictor': 1e3 * mid.get('predict', 0.0) / n_run,
          'routes': 1e3 * mid.get('routes', 0.0) / n_run,
          'host_dispatch': 1e3 * max(routed_s - mid.get('predict', 0.0) - mid.get('routes', 0.0),
                                     0.0) / n_run},
      'overhead_batch1': {
          'cheapest_route': f'exit{exits[cheapest]}' if cheapest < len(exits) else 'backbone',
          'cheapest_route_ms': 1e3 * t1['cheap'],
          'prefix_and_predictor_ms': 1e3 * t1['pred'],
          'prefix_ms': 1e3 * t1['prefix'],
          'prefix_and_retrieval_ms': 1e3 * t1['guide'],
          'predictor_share_of_cheapest': t1['pred'] / t1['cheap'],
          'retrieval_share_of_cheapest': max(t1['guide'] - t1['prefix'], 0.0) / t1['cheap']},
  }
  print(f'[sweep] backbone {lat["backbone_ms_per_image"]:.2f} ms/img, routed '
        f'{lat["routed_ms_per_image"]:.2f} ms/img -> x{lat["speedup"]:.2f}', flush=True)
  return lat


def sample_grid(pipeline: Any, inputs: Sequence[np.ndarray], exits_taken: np.ndarray
                ) -> dict[str, Any]:
  """Images of the sample grid for the first len(exits_taken) inputs: every route ('exits',
  route order), the routed image, and the inputs (OASIS: 'labels'; head avatars: 'inputs' =
  [(name, images)] of source, driver and the guiding bank frame, as in Fig. 5)."""
  fns = _jitted(pipeline)
  k = len(exits_taken)
  x = tuple(jnp.asarray(a[:k]) for a in inputs)
  stack = [np.asarray(a) for a in fns['all'](pipeline.params, *x)]
  out = {'exits': stack, 'routed': np.stack([stack[e][i] for i, e in enumerate(exits_taken)]),
         'routed_exit': np.asarray(exits_taken).tolist()}
  if not is_heads(pipeline.config):
    return out | {'labels': np.asarray(inputs[0][:k])}
  cols = [('source', np.asarray(inputs[0][:k])), ('driver', np.asarray(inputs[1][:k]))]
  frame = fns['guide'](pipeline.params, *x)['frame']
  if frame is not None:
    cols.append(('bank frame', np.asarray(frame)))
  return out | {'inputs': cols}


def headline_row(rows: list[dict[str, Any]], prefix: str,
                 target: float = TARGET_LPIPS) -> tuple[dict[str, Any], bool]:
  """The row of the largest threshold whose realised mean LPIPS <= target (else the
  smallest threshold, flagged False)."""
  ok = [r for r in rows if r[prefix + 'mean_true_lpips'] <= target]
  if ok:
    return max(ok, key=lambda r: r['threshold']), True
  return min(rows, key=lambda r: r['threshold']), False


def gain_slope(rows: list[dict[str, Any]], prefix: str) -> float:
  """GFLOPs/LPIPS gain (Sec. 3.4): minus the least-squares slope of mean GMACs against
  realised mean LPIPS over the sweep (the paper fits a constant slope to its Fig. 3 curve)."""
  x = np.array([r[prefix + 'mean_true_lpips'] for r in rows])
  y = np.array([r[prefix + 'mean_gmacs'] for r in rows])
  if len(x) < 2 or np.ptp(x) <= 0:
    return math.nan
  return float(-np.polyfit(x, y, 1)[0])


def unguided_lpips(config: ml_collections.ConfigDict, workdir: str,
                   inputs: Sequence[np.ndarray], batch_size: int) -> np.ndarray | None:
  """Fig. 8's unguided curves: LPIPS vs the backbone of every exit of the no-bank ablation
  (`train.py --stage=branches --config.branches.use_bank=False` in the same workdir, into
  checkpoints/branches_nobank) on the sweep's own inputs, (N, E); None when it was not
  trained (or the config itself is unguided)."""
  from fiancee_jax import fiancee  # noqa: PLC0415
  from fiancee_jax.metrics import lpips as lpips_lib  # noqa: PLC0415
  from fiancee_jax.train import checkpoint  # noqa: PLC0415
  nobank = checkpoint.checkpoint_dir(workdir, fiancee.branches_subdir(False))
  if not config.branches.use_bank or not os.path.isdir(nobank) or not os.listdir(nobank):
    return None
  print(f'[sweep] Fig. 8: the unguided branches of {nobank} on the same inputs', flush=True)
  pipeline = fiancee.load_pipeline(config, workdir, stages=('backbone', 'branches'),
                                   use_bank=False)
  if is_heads(config):  # the target function takes the frames as uint8, like the datasets
    to_u8 = lambda x: np.round((np.asarray(x) + 1.0) * 127.5).astype(np.uint8)  # noqa: E731
    inputs = (to_u8(inputs[0]), to_u8(inputs[1]), inputs[2])
  rows = tp.compute_rows(pipeline, pipeline.params, lpips_lib.load_params(), inputs,
                         batch_size, name='test, no bank')
  return rows['targets']


def sweep(config: ml_collections.ConfigDict, workdir: str, *,
          thresholds: Sequence[float] | None = None, out_dir: str | None = None,
          repeats: int = 3, batch_size: int | None = None,
          num_samples: int = 4, pipeline: Any = None) -> dict[str, Any]:
  """Run the sweep on the predictor's test split and write the report; returns the summary
  (also `<out_dir>/summary.json`, default `<workdir>/report`). Head-avatar configs add
  Fig. 10 (routes vs the driver's head rotation) and source | driver | bank frame samples."""
  from fiancee_jax import report  # noqa: PLC0415
  thresholds = tuple(config.routing.thresholds if thresholds is None else thresholds)
  if not thresholds:
    raise InferError('--thresholds is empty: expected at least one LPIPS value')
  thresholds = tuple(sorted(check_threshold(t) for t in thresholds))
  pipeline = pipeline or load(config, workdir)
  out_dir = out_dir or os.path.join(os.path.abspath(workdir), 'report')
  alpha = float(config.routing.alpha)
  costs = np.asarray(pipeline.costs, np.float64)
  exits = [int(k) for k in pipeline.exits]

  print('[sweep] predictor datasets (cached by train.py --stage=predictor)', flush=True)
  test = tp.dataset(config, workdir, 'test', pipeline)
  cal = tp.dataset(config, workdir, 'calibration', pipeline)
  pred = tp.predict(pipeline.predictor, pipeline.params['predictor']['params'], test['feats'])
  pred_cal = tp.predict(pipeline.predictor, pipeline.params['predictor']['params'], cal['feats'])
  true, true_cal = test['targets'], cal['targets']
  rows = routing.sweep_rows(pred, true, costs, thresholds, alpha, pred_cal, true_cal)
  head, met = headline_row(rows, 'calibrated_')
  head_paper, met_paper = headline_row(rows, '')

  # Fig. 9: each exit alone vs the predictor enforcing that exit's mean quality (paper rule).
  fig9 = []
  for e, k in enumerate(exits):
    t_k = float(np.mean(true[:, e]))
    if t_k > 0:
      chosen = np.asarray(routing.choose_exit(pred, t_k, costs))
      fig9.append({'exit': k, 'threshold': t_k, 'single': true[:, e].tolist(),
                   'routed': routing.chosen_lpips(true, chosen).tolist()})

  inputs, extra = _sweep_inputs(config, workdir, test)
  n = len(true)
  bs = int(batch_size or min(n, max(config.routing.bucket_sizes)))
  offset = head['offset'] if math.isfinite(head['offset']) else (
      math.inf if head['offset'] > 0 else -1e9)
  t_head = head['threshold']
  latency = measure_latency(pipeline, inputs, bs, repeats, t_head, offset)
  taken = np.asarray(routing.choose_exit(pred, t_head, costs, offset))
  samples = sample_grid(pipeline, inputs, taken[:min(num_samples, n)])

  true_nobank = unguided_lpips(config, workdir, inputs, bs)

  eval_path = os.path.join(tp.stage_dir(workdir), 'eval.json')
  pred_eval = json.load(open(eval_path)) if os.path.exists(eval_path) else None
  gm = costs[-1]
  ob = latency['overhead_batch1']
  summary = {
      'threshold': head['threshold'],
      'rule': f'conformal offset (alpha={alpha}) calibrated on {len(true_cal)} held-out inputs',
      'meets_target': met, 'target_mean_lpips': TARGET_LPIPS,
      'mean_lpips': head['calibrated_mean_true_lpips'],
      'violation_rate': head['calibrated_violation_rate'],
      'gmacs_share': head['calibrated_mean_gmacs'] / gm,
      'mean_gmacs': head['calibrated_mean_gmacs'], 'backbone_gmacs': float(gm),
      'exit_counts': head['calibrated_exit_counts'],
      'offset': head['offset'],
      'latency_speedup': latency['speedup'],
      'gain_gmacs_per_lpips': gain_slope(rows, 'calibrated_'),
      'routing_overhead_share_of_cheapest': (
          ob['prefix_and_predictor_ms'] + max(ob['prefix_and_retrieval_ms'] - ob['prefix_ms'],
                                              0.0)) / ob['cheapest_route_ms'],
      'paper_rule': {'threshold': head_paper['threshold'], 'meets_target': met_paper,
                     'mean_lpips': head_paper['mean_true_lpips'],
                     'violation_rate': head_paper['violation_rate'],
                     'gmacs_share': head_paper['mean_gmacs'] / gm,
                     'gain_gmacs_per_lpips': gain_slope(rows, '')},
      'num_test': int(n), 'device': device_name(), 'config': config.name,
      'workdir': os.path.abspath(workdir),
  }
  result = {
      'kind': 'heads' if is_heads(config) else 'oasis',
      'summary': summary, 'rows': rows, 'exits': exits, 'costs': costs.tolist(),
      'alpha': alpha, 'true': true, 'pred': pred, 'true_nobank': true_nobank, 'fig9': fig9,
      'latency': latency, 'predictor_eval': pred_eval, 'samples': samples,
  }
  if is_heads(config):
    result['rotation'] = dict(rotation_data(pipeline, test, inputs[2], extra['driver_pose'],
                                            taken), threshold=t_head)
  paths = report.write(out_dir, result)
  summary['report'] = paths['report']
  return summary

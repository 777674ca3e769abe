"""User inputs of inference: thresholds, label PNGs, RGB images, data split examples, noises.

Every reader ends a bad input in one `InferError` naming the flag and what was expected, before
any stage is loaded. What the inputs of a backbone are (which flags, how they become route
inputs) is the adapter's: `Backbone.infer_inputs()` returns a `BackboneInputs` (OASIS: a
label map + a noise seed; head avatars: a (source, driver) pair + the source identity).
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import math
import os
from typing import Any, Callable, ClassVar, Sequence

import jax
import ml_collections
import numpy as np

from fiancee_jax import workdir as wd
from fiancee_jax.errors import FianceeError

TARGET_LPIPS = 0.1   # the headline quality (issue: mean LPIPS <= 0.1)


class InferError(FianceeError):
  """Bad user input to inference: one clear message."""


# ---------------------------------------------------------------------------------------------
# What a backbone's inputs are (the adapter's half).


@dataclasses.dataclass
class Request:
  """One input of `infer.py`, read and checked.

  inputs       the route inputs, batch 1 (OASIS: labels (1, H, W) int32, z (1, z_dim); heads:
               source, driver (1, H, W, 3) in [-1, 1], identity (1,) int32)
  name         file stem of the default output (`<workdir>/infer/<name>_t<threshold>.png`)
  info         what the JSON line adds about the input (noise_seed, identity, ...)
  bank_select  what `stages.load_pipeline` loads of the bank (heads: identities=[source's])
  """
  inputs: tuple
  name: str
  info: dict[str, Any]
  bank_select: dict[str, Any] = dataclasses.field(default_factory=dict)


class BackboneInputs(abc.ABC):
  """The per-backbone half of inference inputs (`Backbone.infer_inputs()`)."""

  report_kind: ClassVar[str]   # the report's figure names and wording (`infer.report.KINDS`)

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @abc.abstractmethod
  def from_flags(self, workdir: str, flags: dict[str, Any]) -> Request:
    """infer.py's input flags (label, index, split, noise_seed, source, driver, source_index,
    driver_index, identity; None when not given) -> one checked `Request`. Flags of another
    backbone, or a missing or doubled input, end in one InferError."""

  @abc.abstractmethod
  def from_rows(self, workdir: str, rows: dict[str, Any]
                ) -> tuple[tuple[np.ndarray, ...], dict[str, Any]]:
    """Rows of a predictor split (`train.predictor.dataset`) -> (route inputs, leading axis N;
    extras the sweep hands back to `sweep_extras`)."""

  @abc.abstractmethod
  def sample_columns(self, inputs: Sequence[np.ndarray], k: int, guide: Any
                     ) -> dict[str, Any]:
    """What the sample grid shows of the first k inputs besides the routes: {'labels': ...}
    (a label map column) or {'inputs': [(name, images (k, H, W, 3))]} (`guide`: the
    retrieved guide of those inputs, or None)."""

  def sweep_extras(self, pipeline: Any, rows: dict[str, Any], inputs: Sequence[np.ndarray],
                   extra: dict[str, Any], taken: np.ndarray, threshold: float
                   ) -> dict[str, Any]:
    """Result entries only this backbone's report has (heads: 'rotation', Fig. 10)."""
    return {}


# ---------------------------------------------------------------------------------------------
# Thresholds.


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


def check_workdir(workdir: str) -> None:
  if not os.path.isdir(workdir):
    raise InferError(f'--workdir={workdir!r} does not exist: run the stages first '
                     '(train.py --stage=backbone, build_bank.py, train.py --stage=branches, '
                     'train.py --stage=predictor)')


def given(flags: dict[str, Any], names: Sequence[str]) -> list[str]:
  """The flags of `names` that were given (not None)."""
  return [n for n in names if flags.get(n) is not None]


# ---------------------------------------------------------------------------------------------
# Image files.


def open_image(path: str, flag: str, what: str, check: Callable | None = None,
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


def check_size(arr: np.ndarray, flag: str, path: str, config: ml_collections.ConfigDict,
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
  arr = open_image(path, 'label', LABEL_PNG,
                   check=functools.partial(_check_label_file, path=path))
  if arr.ndim == 3:
    if np.all(arr[..., :3] == arr[..., :1]):
      arr = arr[..., 0]
    else:
      raise InferError(f'--label={path!r}: colour image (mode RGB{"A" * (arr.shape[2] == 4)}, '
                       f'channels differ: a colour-coded map?); expected {LABEL_PNG}')
  check_size(arr, 'label', path, config)
  bad = np.unique(arr[(arr < 0) | (arr >= d.num_classes)])
  if bad.size:
    raise InferError(f'--label={path!r}: unknown class ids {bad[:10].tolist()}; expected ids in '
                     f'[0, {d.num_classes})')
  return arr.astype(np.int32)


def read_image(path: str, config: ml_collections.ConfigDict, flag: str) -> np.ndarray:
  """An RGB PNG/JPEG of the config's resolution -> (H, W, 3) uint8 (alpha dropped, grey
  expanded); one InferError naming `flag` for a missing, unreadable or wrongly sized file."""
  arr = open_image(path, flag, 'an RGB image', mode='RGB')
  check_size(arr, flag, path, config, ' RGB')
  return arr.astype(np.uint8)


def to_pm1(images: np.ndarray) -> np.ndarray:
  """uint8 images -> float32 in [-1, 1] (the models' range)."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


def stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


# ---------------------------------------------------------------------------------------------
# Data split examples, noises.


def _source(config: ml_collections.ConfigDict, workdir: str, split: str):
  from fiancee_jax import data  # noqa: PLC0415 (heavy: tfds)
  return data.source(config.data, split, wd.data_dir(config, workdir))


def dataset_labels(config: ml_collections.ConfigDict, workdir: str, split: str,
                   indices: Sequence[int], flag: str = 'index') -> np.ndarray:
  """Label maps (N, H, W) int32 of examples `indices` of a prepared data split (each distinct
  example read once); an index outside the split ends in one InferError naming --flag."""
  src = _source(config, workdir, split)
  idx = np.asarray(indices, np.int64)
  bad = [int(i) for i in idx if not 0 <= int(i) < len(src)]
  if bad:
    raise InferError(f'--{flag}={bad[0]}: the {split!r} split has {len(src)} examples')
  uniq, inv = np.unique(idx, return_inverse=True)
  return np.stack([np.asarray(src[int(i)]['label'], np.int32) for i in uniq])[inv]


def dataset_label(config: ml_collections.ConfigDict, workdir: str, split: str,
                  index: int) -> np.ndarray:
  """Label map `index` of a prepared data split, (H, W) int32."""
  return dataset_labels(config, workdir, split, [int(index)])[0]


def split_frames(config: ml_collections.ConfigDict, workdir: str, split: str,
                 indices: Sequence[int], flag: str = 'index'
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """(images (N, H, W, 3) uint8, identities (N,) int32, ground-truth poses (N, 3) degrees or
  None when the data has none) of examples `indices` of a prepared head-avatar split."""
  src = _source(config, workdir, split)
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


def noise(config: ml_collections.ConfigDict, seed: int) -> np.ndarray:
  """z (z_dim,) drawn from `seed` (the same seed gives the same image)."""
  return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (config.model.z_dim,)),
                    np.float32)

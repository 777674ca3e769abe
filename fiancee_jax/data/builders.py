"""tensorflow-datasets builders (array_record, no TensorFlow) for the four datasets.

Each builder takes a BuilderConfig whose `name` encodes every field that changes the
content (resolution, sizes, seed), so `<data_dir>/<builder>/<config name>/<version>` never
mixes two resolutions. Builders are not registered in the global tfds registry (no name
clash with tfds' own `cityscapes`); `fiancee_jax.data.source` reads them with
`builder.as_data_source(split)`, the random-access reader behind `tfds.data_source`.

Images (and label maps / masks as 1-channel images) are stored as PNG bytes encoded with
Pillow; reading decodes with Pillow. Neither needs TensorFlow.

`prepare` is kill-safe: tfds writes every split and dataset_info.json into
`<config>/incomplete.XXXXXX_<version>/` and renames it to `<version>/` at the end, so a killed
prepare never leaves a dataset under the version name. Under a lock (flock, released when its
holder dies) the next prepare removes such leftovers and any version folder that is not a
complete dataset (`missing`), each with one printed line, and builds it again.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import io
import logging
import os
import pathlib
import shutil
import time
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from fiancee_jax.data import common, heads, streets
from fiancee_jax.errors import FianceeError


class _QuietTfds(logging.Filter):
  """Drops tensorflow-datasets' INFO / WARNING records ('Using custom data configuration',
  'OpenCV is not installed', ...): our builders are configured on purpose, and the stages
  print their own progress. Its errors still show."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or 'tensorflow_datasets' not in record.pathname


logging.getLogger('absl').addFilter(_QuietTfds())

SPLITS = ('train', 'validation', 'test')
IMAGE_EXTS = ('.png', '.jpg', '.jpeg')
VIDEO_EXTS = ('.mp4', '.avi', '.mov', '.mkv', '.webm')


class DataError(FianceeError):
  """Missing, incomplete or unreadable dataset input (names the path and what was expected)."""


def _img(h: int, w: int, c: int = 3) -> tfds.features.Image:
  return tfds.features.Image(shape=(h, w, c), encoding_format='png')


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared: array_record files, DatasetInfo built in place, optional worker processes."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First version.'}
  # Nothing to download: no checksums file. (tfds would look for one next to the module via
  # `importlib_resources`, a package we do not need.)
  code_path = None
  url_infos = None

  def __init__(self, *, config: tfds.core.BuilderConfig, data_dir: str, num_workers: int = 0):
    self._num_workers = num_workers
    super().__init__(config=config, data_dir=data_dir, file_format='array_record')

  def _map(self, fn, items) -> Iterator[Any]:
    """`map(fn, items)` in order, over worker processes when asked (prepare is CPU-bound)."""
    if self._num_workers <= 0:
      yield from map(fn, items)
      return
    with concurrent.futures.ProcessPoolExecutor(self._num_workers) as ex:
      yield from ex.map(fn, items, chunksize=8)


# --- synthetic_streets --------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class StreetsConfig(tfds.core.BuilderConfig):
  height: int = 64
  width: int = 128
  num_train: int = 2000
  num_validation: int = 200
  num_test: int = 200
  seed: int = 0


def _street_example(args):
  seed, split, index, h, w = args
  image, label, difficulty = streets.render(common.example_rng(seed, split, index), h, w)
  return index, {'image': common.png_bytes(image), 'label': common.png_bytes(label),
                 'difficulty': np.float32(difficulty), 'index': index}


class SyntheticStreets(_Builder, skip_registration=True):
  """Procedural Cityscapes-like street scenes; see `fiancee_jax.data.streets`."""
  name = 'synthetic_streets'

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        disable_shuffling=True,   # example i of a split is the generator's i-th (index == i)
        description='Procedural street scenes with Cityscapes label ids (0..33; 34 unknown).',
        features=tfds.features.FeaturesDict({
            'image': _img(c.height, c.width),
            'label': _img(c.height, c.width, 1),
            'difficulty': tfds.features.Scalar(np.float32),
            'index': tfds.features.Scalar(np.int64),
        }))

  def _split_generators(self, dl_manager):
    c = self.builder_config
    sizes = {'train': c.num_train, 'validation': c.num_validation, 'test': c.num_test}
    return {s: self._generate_examples(s, n) for s, n in sizes.items() if n > 0}

  def _generate_examples(self, split: str, n: int):
    c = self.builder_config
    yield from self._map(_street_example, [(c.seed, split, i, c.height, c.width)
                                           for i in range(n)])


# --- synthetic_heads ----------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class HeadsConfig(tfds.core.BuilderConfig):
  size: int = 64
  num_identities: int = 50
  frames_per_identity: int = 40
  seed: int = 0


def _head_example(args):
  seed, identity, frame, size, index = args
  ex = heads.render_frame(seed, identity, frame, size)
  return index, {'image': common.png_bytes(ex['image']), 'mask': common.png_bytes(ex['mask']),
                 'pose': ex['pose'], 'expression': ex['expression'],
                 'identity': np.int32(identity), 'frame': np.int32(frame), 'index': index}


class SyntheticHeads(_Builder, skip_registration=True):
  """Procedural rendered heads; identities are split between train/validation/test."""
  name = 'synthetic_heads'

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.size
    return tfds.core.DatasetInfo(
        builder=self,
        disable_shuffling=True,   # example i of a split is the generator's i-th (index == i)
        description='Procedural heads with pose (yaw, pitch, roll; degrees) and expression.',
        features=tfds.features.FeaturesDict({
            'image': _img(s, s),
            'mask': _img(s, s, 1),
            'pose': tfds.features.Tensor(shape=(3,), dtype=np.float32),
            'expression': tfds.features.Tensor(shape=(heads.EXPR_DIM,), dtype=np.float32),
            'identity': tfds.features.Scalar(np.int32),
            'frame': tfds.features.Scalar(np.int32),
            'index': tfds.features.Scalar(np.int64),
        }))

  def _split_generators(self, dl_manager):
    c = self.builder_config
    ids = heads.split_identities(c.num_identities)
    return {s: self._generate_examples(ids[s]) for s in SPLITS if ids[s]}

  def _generate_examples(self, identities):
    c = self.builder_config
    f = c.frames_per_identity
    jobs = [(c.seed, ident, fr, c.size, k * f + fr) for k, ident in enumerate(identities)
            for fr in range(f)]
    yield from self._map(_head_example, jobs)


# --- cityscapes (manual download) ---------------------------------------------------------

@dataclasses.dataclass(eq=False)
class CityscapesConfig(tfds.core.BuilderConfig):
  height: int = 256
  width: int = 512


_CITYSCAPES_SPLITS = {'train': 'train', 'validation': 'val'}


def cityscapes_files(manual_dir: str) -> dict[str, list[tuple[str, str]]]:
  """{split: [(image path, labelIds path)]} of a Cityscapes download; DataError if missing
  or incomplete (every image needs its gtFine labelIds file)."""
  root = pathlib.Path(manual_dir or '')
  expected = ('expected <manual_dir>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and '
              '<manual_dir>/gtFine/{train,val}/<city>/*_gtFine_labelIds.png')
  if not manual_dir or not root.is_dir():
    raise DataError(f'cityscapes: manual_dir={manual_dir!r} is not a directory; {expected}')
  out, problems = {}, []
  for split, folder in _CITYSCAPES_SPLITS.items():
    img_dir, lab_dir = root / 'leftImg8bit' / folder, root / 'gtFine' / folder
    images = sorted(img_dir.glob('*/*_leftImg8bit.png'))
    if not images:
      problems.append(f'no images in {img_dir}/<city>/*_leftImg8bit.png')
      continue
    pairs = []
    for im in images:
      stem = im.name[:-len('_leftImg8bit.png')]
      lab = lab_dir / im.parent.name / f'{stem}_gtFine_labelIds.png'
      if not lab.is_file():
        problems.append(f'missing label file {lab} (for {im})')
      pairs.append((str(im), str(lab)))
    out[split] = pairs
  if problems:
    shown = problems[:5] + ([f'... and {len(problems) - 5} more'] if len(problems) > 5 else [])
    raise DataError(f'cityscapes: incomplete manual_dir {manual_dir!r}: ' + '; '.join(shown)
                    + f'; {expected}')
  return out


def _read_png(path: str, mode: str) -> np.ndarray:
  from PIL import Image
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert(mode))
  except Exception as e:  # Pillow raises several types for corrupt files
    raise DataError(f'cannot read image {path}: {type(e).__name__}: {e}') from e


def _cityscapes_example(args):
  index, image_path, label_path, h, w = args
  image = common.resize_image(_read_png(image_path, 'RGB'), h, w)
  label = common.resize_label(_read_png(label_path, 'L'), h, w)
  label = np.where(label > common.UNKNOWN_ID - 1, common.UNKNOWN_ID, label).astype(np.uint8)
  return index, {'image': common.png_bytes(image), 'label': common.png_bytes(label),
                 'index': index, 'file_name': os.path.basename(image_path)}


class Cityscapes(_Builder, skip_registration=True):
  """Cityscapes fine annotations from the user's download, resized as OASIS does."""
  name = 'cityscapes'

  def __init__(self, *, manual_dir: str = '', **kw):
    self._manual = manual_dir
    super().__init__(**kw)

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        disable_shuffling=True,   # example i of a split is the generator's i-th (index == i)
        description='Cityscapes leftImg8bit + gtFine labelIds (ids > 33 -> 34 unknown).',
        features=tfds.features.FeaturesDict({
            'image': _img(c.height, c.width),
            'label': _img(c.height, c.width, 1),
            'index': tfds.features.Scalar(np.int64),
            'file_name': tfds.features.Text(),
        }))

  def _split_generators(self, dl_manager):
    files = cityscapes_files(self._manual)
    return {s: self._generate_examples(p) for s, p in files.items()}

  def _generate_examples(self, pairs):
    c = self.builder_config
    yield from self._map(_cityscapes_example,
                         [(i, im, lab, c.height, c.width) for i, (im, lab) in enumerate(pairs)])


# --- video_frames (VoxCeleb2-style folders) -----------------------------------------------

@dataclasses.dataclass(eq=False)
class VideoConfig(tfds.core.BuilderConfig):
  size: int = 512
  frames_per_video: int = 8


def _is_video(p: pathlib.Path) -> bool:
  return p.suffix.lower() in VIDEO_EXTS


def video_layout(manual_dir: str) -> dict[str, list[tuple[int, int, list[str]]]]:
  """{split: [(identity id, video id, [files])]} of an `identity/video/{*.mp4|frames}` tree.

  Split folders `train/`, `validation/` (or `dev/`), `test/` under manual_dir are used when
  present; otherwise identities (sorted) are split: the last ~10% (at least 1, when there are
  >= 3) go to test, the ~10% before them to validation, the rest to train.
  """
  root = pathlib.Path(manual_dir or '')
  expected = ('expected <manual_dir>/<identity>/<video>/*.mp4 (or *.png|*.jpg frames), '
              'optionally under train/, validation/, test/')
  if not manual_dir or not root.is_dir():
    raise DataError(f'video_frames: manual_dir={manual_dir!r} is not a directory; {expected}')

  def identities(d: pathlib.Path):
    return sorted(p for p in d.iterdir() if p.is_dir())

  named = {'train': ['train', 'dev'], 'validation': ['validation', 'val'], 'test': ['test']}
  split_dirs = {s: next((root / n for n in names if (root / n).is_dir()), None)
                for s, names in named.items()}
  if split_dirs['train'] is not None:
    per_split = {s: identities(d) if d is not None else [] for s, d in split_dirs.items()}
  else:
    ids = identities(root)
    k = max(1, round(0.1 * len(ids))) if len(ids) >= 3 else 0
    n_train = len(ids) - 2 * k
    per_split = {'train': ids[:n_train], 'validation': ids[n_train:n_train + k],
                 'test': ids[n_train + k:]}
  out, ident_id, video_id = {}, 0, 0
  for split in SPLITS:
    entries = []
    for ident in per_split[split]:
      for video in sorted(p for p in ident.iterdir() if p.is_dir()):
        files = sorted(p for p in video.iterdir() if p.is_file())
        clips = [str(p) for p in files if _is_video(p)]
        frames = [str(p) for p in files if p.suffix.lower() in IMAGE_EXTS]
        if clips or frames:
          entries.append((ident_id, video_id, clips if clips else frames))
          video_id += 1
      ident_id += 1
    if entries:
      out[split] = entries
  if 'train' not in out:
    raise DataError(f'video_frames: no videos or frames found under {manual_dir!r}; {expected}')
  return out


def read_video_frames(path: str, count: int) -> list[np.ndarray]:
  """`count` evenly spaced RGB frames of a video file (imageio + its ffmpeg binary)."""
  import imageio.v2 as imageio
  try:
    reader = imageio.get_reader(path, 'ffmpeg')
    try:
      frames = [np.asarray(f)[..., :3] for f in reader]
    finally:
      reader.close()
  except Exception as e:  # imageio/ffmpeg raise many types for unreadable files
    raise DataError(f'cannot read video {path}: {type(e).__name__}: {e}') from e
  if not frames:
    raise DataError(f'cannot read video {path}: no frames decoded')
  keep = np.unique(np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int))
  return [frames[i] for i in keep]


def _square(image: np.ndarray, size: int) -> np.ndarray:
  return common.resize_image(np.ascontiguousarray(common.center_crop_square(image)), size, size)


class VideoFrames(_Builder, skip_registration=True):
  """Frames of VoxCeleb2-style videos, centre-cropped square and resized; pairs of frames of
  one video come from `fiancee_jax.data.reenactment_pairs(source, seed, group='video')`."""
  name = 'video_frames'

  def __init__(self, *, manual_dir: str = '', **kw):
    self._manual = manual_dir
    super().__init__(**kw)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.size
    return tfds.core.DatasetInfo(
        builder=self,
        disable_shuffling=True,   # example i of a split is the generator's i-th (index == i)
        description='Video frames, centre-cropped to a square.',
        features=tfds.features.FeaturesDict({
            'image': _img(s, s),
            'identity': tfds.features.Scalar(np.int32),
            'video': tfds.features.Scalar(np.int32),
            'frame': tfds.features.Scalar(np.int32),
            'index': tfds.features.Scalar(np.int64),
            'file_name': tfds.features.Text(),
        }))

  def _split_generators(self, dl_manager):
    layout = video_layout(self._manual)
    return {s: self._generate_examples(e) for s, e in layout.items()}

  def _generate_examples(self, entries):
    c = self.builder_config
    index = 0
    for ident, video, files in entries:
      if _is_video(pathlib.Path(files[0])):
        frames = [(f, fr) for f in files for fr in read_video_frames(f, c.frames_per_video)]
      else:
        keep = np.unique(np.linspace(0, len(files) - 1, min(c.frames_per_video, len(files)))
                         .round().astype(int))
        frames = [(files[i], _read_png(files[i], 'RGB')) for i in keep]
      for k, (path, frame) in enumerate(frames):
        yield index, {'image': common.png_bytes(_square(frame, c.size)), 'identity': ident,
                      'video': video, 'frame': k, 'index': index,
                      'file_name': os.path.basename(path)}
        index += 1


# --- from a config ------------------------------------------------------------------------

NAMES = ('synthetic_streets', 'synthetic_heads', 'cityscapes', 'video_frames')


def _source_tag(manual_dir: str) -> str:
  """Short hash of a manual download's absolute path: part of the prepared folder's name, so
  two downloads prepared into one data_dir never reuse each other's records."""
  path = os.path.abspath(manual_dir) if manual_dir else ''
  return 'src' + hashlib.sha256(path.encode()).hexdigest()[:8]


def make_builder(data_config: Any, data_dir: str) -> _Builder:
  """The builder for `config.data` (fields name, height, width, num_*, seed, manual_dir,
  num_identities, frames_per_identity, frames_per_video, num_workers)."""
  g = functools.partial(common.get, data_config)
  name = g('name', '')
  h, w = int(g('height', 64)), int(g('width', 128))
  workers = int(g('num_workers', 0))
  if h <= 0 or w <= 0:
    raise DataError(f'data resolution {h}x{w}: expected positive height and width')
  if name == 'synthetic_streets':
    cfg = StreetsConfig(name=f'{h}x{w}_n{g("num_train", 2000)}-{g("num_validation", 200)}-'
                        f'{g("num_test", 200)}_seed{g("seed", 0)}', height=h, width=w,
                        num_train=int(g('num_train', 2000)),
                        num_validation=int(g('num_validation', 200)),
                        num_test=int(g('num_test', 200)), seed=int(g('seed', 0)))
    return SyntheticStreets(config=cfg, data_dir=data_dir, num_workers=workers)
  if name == 'synthetic_heads':
    if h != w:
      raise DataError(f'synthetic_heads: data resolution {h}x{w}: expected a square size')
    ni, fr, seed = int(g('num_identities', 50)), int(g('frames_per_identity', 40)), int(g('seed', 0))
    if ni < 1 or fr < 1:
      raise DataError(f'synthetic_heads: num_identities={ni}, frames_per_identity={fr}: '
                      'expected >= 1 each')
    cfg = HeadsConfig(name=f'{h}_ids{ni}_f{fr}_seed{seed}', size=h, num_identities=ni,
                      frames_per_identity=fr, seed=seed)
    return SyntheticHeads(config=cfg, data_dir=data_dir, num_workers=workers)
  if name == 'cityscapes':
    manual = str(g('manual_dir', ''))
    return Cityscapes(config=CityscapesConfig(name=f'{h}x{w}_{_source_tag(manual)}', height=h,
                                              width=w),
                      data_dir=data_dir, manual_dir=manual, num_workers=workers)
  if name == 'video_frames':
    if h != w:
      raise DataError(f'video_frames: data resolution {h}x{w}: expected a square size')
    fpv = int(g('frames_per_video', 8))
    if fpv < 1:
      raise DataError(f'video_frames: frames_per_video={fpv}: expected >= 1')
    manual = str(g('manual_dir', ''))
    return VideoFrames(config=VideoConfig(name=f'{h}_f{fpv}_{_source_tag(manual)}', size=h,
                                          frames_per_video=fpv),
                       data_dir=data_dir, manual_dir=manual)
  raise DataError(f'data.name={name!r}: expected one of {NAMES}')


# --- prepare (kill-safe) ------------------------------------------------------------------

def missing(builder: _Builder) -> str | None:
  """None if the builder's version folder holds a complete dataset (dataset_info.json,
  features.json and every split's record files), else what is missing."""
  path = pathlib.Path(str(builder.data_path))
  if not path.is_dir():
    return 'not prepared yet'
  if not builder.is_prepared():
    return f'{path} has no dataset_info.json / features.json'
  for name, split in builder.info.splits.items():
    absent = [os.path.basename(str(f)) for f in split.filepaths if not os.path.isfile(str(f))]
    if absent:
      return f'{path}: split {name!r} lacks {", ".join(absent)}'
  return None


def prepare(data_config: Any, data_dir: str) -> pathlib.Path:
  """Write every split of `data_config` as array_record under `data_dir` unless a complete
  copy is there; returns `<data_dir>/<name>/<config>/<version>` (see the module doc)."""
  from tensorflow_datasets.core import constants  # noqa: PLC0415
  b = make_builder(data_config, data_dir)
  if missing(b) is None:
    return pathlib.Path(str(b.data_path))
  version_dir = pathlib.Path(str(b.data_path))
  version_dir.parent.mkdir(parents=True, exist_ok=True)
  with open(version_dir.parent / '.prepare.lock', 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one preparer per config; a concurrent one waits
    leftovers = sorted(version_dir.parent.glob(
        f'{constants.INCOMPLETE_PREFIX}*_{version_dir.name}'))
    for d in leftovers:
      shutil.rmtree(d, ignore_errors=True)
    if leftovers:
      print(f'[data] removed {", ".join(d.name for d in leftovers)} in {version_dir.parent} '
            '(a prepare killed before it finished); preparing again', flush=True)
    b = make_builder(data_config, data_dir)  # what the lock holder before us may have written
    why = missing(b)
    if why is not None and version_dir.exists():
      print(f'[data] {why}: removing it and preparing again', flush=True)
      shutil.rmtree(version_dir)
      b = make_builder(data_config, data_dir)
    if why is not None:
      t0 = time.perf_counter()
      print(f'[data] preparing {version_dir} ...', flush=True)
      tfds.disable_progress_bar()  # tfds's bars and banner; our two lines say the same
      with contextlib.redirect_stdout(io.StringIO()):
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
      counts = ', '.join(f'{k} {v.num_examples}' for k, v in b.info.splits.items())
      print(f'[data] prepared {counts} examples in {time.perf_counter() - t0:.0f} s', flush=True)
  return version_dir

"""Helpers shared by the dataset builders: PNG coding, resizing, Cityscapes palette, seeding.

Images are PNG-encoded with Pillow here (the tfds `Image` feature would call TensorFlow to
encode a numpy array; given bytes it stores them as they are and decodes with Pillow), so
neither writing nor reading a dataset needs TensorFlow.
"""
from __future__ import annotations

import io
import zlib
from typing import Any

import numpy as np
from PIL import Image

# Cityscapes label ids 0..33 (labels.py of cityscapesScripts) + 34 'unknown'.
CITYSCAPES_NAMES = (
    'unlabeled', 'ego vehicle', 'rectification border', 'out of roi', 'static', 'dynamic',
    'ground', 'road', 'sidewalk', 'parking', 'rail track', 'building', 'wall', 'fence',
    'guard rail', 'bridge', 'tunnel', 'pole', 'polegroup', 'traffic light', 'traffic sign',
    'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'caravan',
    'trailer', 'train', 'motorcycle', 'bicycle', 'unknown')
UNKNOWN_ID = 34
NUM_CLASSES = 35
CITYSCAPES_PALETTE = np.array([
    (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (111, 74, 0), (81, 0, 81),
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70),
    (102, 102, 156), (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90),
    (153, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35),
    (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230), (119, 11, 32),
    (255, 255, 255)], np.uint8)


def colorize(label: np.ndarray) -> np.ndarray:
  """(H, W) Cityscapes label ids -> (H, W, 3) uint8 colours (id 34 'unknown' is white)."""
  return CITYSCAPES_PALETTE[np.clip(label, 0, NUM_CLASSES - 1)]


def png_bytes(array: np.ndarray) -> bytes:
  """uint8 (H, W) or (H, W, 3) array -> PNG bytes (Pillow)."""
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array)).save(buf, format='PNG', compress_level=1)
  return buf.getvalue()


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bicubic resize of an RGB uint8 image (as OASIS: PIL `Image.BICUBIC`)."""
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def resize_label(label: np.ndarray, height: int, width: int) -> np.ndarray:
  """Nearest resize of a label map (as OASIS: PIL `Image.NEAREST`)."""
  if label.shape[:2] == (height, width):
    return label
  return np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))


def center_crop_square(image: np.ndarray) -> np.ndarray:
  """Largest centred square crop of an (H, W, ...) image."""
  h, w = image.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  return image[top:top + s, left:left + s]


_SPLIT_IDS = {'train': 0, 'validation': 1, 'test': 2}


def example_rng(seed: int, split: str, index: int, *extra: int) -> np.random.Generator:
  """The numpy Generator of one synthetic example: a function of (seed, split, index) only."""
  return np.random.default_rng([int(seed), _SPLIT_IDS.get(split, zlib.crc32(split.encode())),
                                int(index), *map(int, extra)])


def get(data_config: Any, key: str, default: Any) -> Any:
  """`data_config.key` if the config has it (ConfigDict, dict or object), else `default`."""
  if isinstance(data_config, dict):
    return data_config.get(key, default)
  try:
    return data_config[key]
  except (KeyError, TypeError, AttributeError):
    return getattr(data_config, key, default)


def smooth_noise(rng: np.random.Generator, height: int, width: int, cells_y: int,
                 cells_x: int, channels: int = 1) -> np.ndarray:
  """Value noise in [-1, 1]: a (cells_y+1, cells_x+1) random grid, bilinearly upsampled.
  Geometry is set in cells, so the pattern is the same at every resolution."""
  grid = rng.uniform(-1, 1, (cells_y + 1, cells_x + 1, channels)).astype(np.float32)
  y = np.linspace(0, cells_y, height, dtype=np.float32)
  x = np.linspace(0, cells_x, width, dtype=np.float32)
  y0 = np.minimum(y.astype(np.int32), cells_y - 1)
  x0 = np.minimum(x.astype(np.int32), cells_x - 1)
  fy = (y - y0)[:, None, None]
  fx = (x - x0)[None, :, None]
  g00 = grid[y0][:, x0]
  g01 = grid[y0][:, x0 + 1]
  g10 = grid[y0 + 1][:, x0]
  g11 = grid[y0 + 1][:, x0 + 1]
  out = (g00 * (1 - fx) + g01 * fx) * (1 - fy) + (g10 * (1 - fx) + g11 * fx) * fy
  return out if channels > 1 else out[..., 0]

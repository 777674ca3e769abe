"""Tiny vectorised rasteriser for the procedural datasets: shapes -> boolean masks on a bbox.

Every primitive returns `(window, mask)`: `window` is a pair of slices into the image and
`mask` a boolean array of that window's shape (pixel centres inside the shape), or None when
the shape misses the image. Coordinates are float pixels (x right, y down).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

Window = tuple[slice, slice]
Shape = Optional[tuple[Window, np.ndarray]]


def _window(h: int, w: int, x0: float, y0: float, x1: float, y1: float):
  c0, c1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)) + 1, w)
  r0, r1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)) + 1, h)
  if c0 >= c1 or r0 >= r1:
    return None
  ys = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
  xs = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5
  return (slice(r0, r1), slice(c0, c1)), ys, xs


def rect(h: int, w: int, x0: float, y0: float, x1: float, y1: float,
         min_px: float = 0.0) -> Shape:
  """Axis-aligned rectangle; `min_px` widens thin ones so they keep >= that many pixels."""
  if x1 - x0 < min_px:
    cx = 0.5 * (x0 + x1)
    x0, x1 = cx - 0.5 * min_px, cx + 0.5 * min_px
  win = _window(h, w, x0, y0, x1, y1)
  if win is None:
    return None
  sl, ys, xs = win
  m = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
  return (sl, m) if m.any() else None


def ellipse(h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> Shape:
  rx, ry = max(rx, 0.5), max(ry, 0.5)
  win = _window(h, w, cx - rx, cy - ry, cx + rx, cy + ry)
  if win is None:
    return None
  sl, ys, xs = win
  m = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
  return (sl, m) if m.any() else None


def polygon(h: int, w: int, pts: Sequence[tuple[float, float]]) -> Shape:
  """Convex polygon (vertices in either winding order)."""
  p = np.asarray(pts, np.float32)
  win = _window(h, w, p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max())
  if win is None:
    return None
  sl, ys, xs = win
  q = np.roll(p, -1, axis=0)
  cross = [(b[0] - a[0]) * (ys - a[1]) - (b[1] - a[1]) * (xs - a[0]) for a, b in zip(p, q)]
  m = np.all([c >= 0 for c in cross], axis=0) | np.all([c <= 0 for c in cross], axis=0)
  return (sl, m) if m.any() else None


def ring(h: int, w: int, cx: float, cy: float, r: float, thickness: float) -> Shape:
  """Annulus (a wheel) with at least one pixel of thickness."""
  r = max(r, 1.0)
  thickness = max(thickness, 1.0)
  win = _window(h, w, cx - r, cy - r, cx + r, cy + r)
  if win is None:
    return None
  sl, ys, xs = win
  d = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
  m = (d <= r) & (d >= r - thickness)
  return (sl, m) if m.any() else None


def line(h: int, w: int, x0: float, y0: float, x1: float, y1: float, width: float) -> Shape:
  """Thick segment, at least one pixel wide."""
  width = max(width, 1.0)
  win = _window(h, w, min(x0, x1) - width, min(y0, y1) - width,
                max(x0, x1) + width, max(y0, y1) + width)
  if win is None:
    return None
  sl, ys, xs = win
  dx, dy = x1 - x0, y1 - y0
  ll = max(dx * dx + dy * dy, 1e-6)
  s = np.clip(((xs - x0) * dx + (ys - y0) * dy) / ll, 0, 1)
  d2 = (xs - x0 - s * dx) ** 2 + (ys - y0 - s * dy) ** 2
  m = d2 <= (0.5 * width) ** 2
  return (sl, m) if m.any() else None


def union(*shapes: Shape) -> list:
  return [s for s in shapes if s is not None]

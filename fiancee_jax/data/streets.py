"""`synthetic_streets`: procedural Cityscapes-like street scenes with Cityscapes label ids.

A pinhole camera over a flat street: the horizon row and the vanishing point are drawn per
scene; the ground is split (in world units of camera heights) into road, sidewalks and
building facades that converge to the vanishing point. Objects (cars, trucks, buses, persons,
riders on bicycles, poles with signs and lights, trees) stand at a depth `t` (1 = the image's
bottom row, 1/t = distance) and are drawn far to near. Each class has its own texture,
facades get a sun side and a shade side, and the sensor adds noise.

Difficulty varies by construction: a per-scene `complexity` latent sets how many objects
and thin structures there are; the stored `difficulty` (in [0, 1]) is the mean of that
latent and the label map's boundary density (share of pixels whose right or lower neighbour
has another class, / 0.12, clipped). Geometry is set in units of the image height, so one
(seed, split, index) gives the same scene at every resolution.
"""
from __future__ import annotations

import numpy as np

from fiancee_jax.data import raster
from fiancee_jax.data.common import smooth_noise

# Cityscapes label ids used here.
EGO, STATIC, GROUND, ROAD, SIDEWALK, BUILDING, WALL, FENCE = 1, 4, 6, 7, 8, 11, 12, 13
POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = 17, 19, 20, 21, 22, 23
PERSON, RIDER, CAR, TRUCK, BUS, BICYCLE = 24, 25, 26, 27, 28, 33

_CAR_COLOURS = np.array([(200, 200, 205), (30, 30, 35), (150, 20, 25), (25, 45, 110),
                         (120, 125, 130), (230, 230, 225), (60, 90, 60), (170, 140, 60)],
                        np.float32)
_FACADE_COLOURS = np.array([(190, 170, 140), (150, 80, 60), (140, 140, 145), (215, 205, 185),
                            (170, 120, 90), (110, 105, 100), (200, 185, 160)], np.float32)
_CLOTHES = np.array([(40, 40, 50), (150, 30, 30), (30, 60, 130), (200, 200, 190),
                     (90, 80, 60), (20, 100, 70), (180, 140, 40), (70, 70, 75)], np.float32)
_SKIN = np.array([(230, 190, 160), (200, 150, 110), (140, 95, 65), (90, 60, 40)], np.float32)


class _Canvas:
  """Image + label map being painted; `paint` writes a colour (or a per-pixel colour
  field) and a label under a mask, modulated by a fine grain noise."""

  def __init__(self, h: int, w: int, grain: np.ndarray):
    self.h, self.w = h, w
    self.img = np.zeros((h, w, 3), np.float32)
    self.lab = np.zeros((h, w), np.uint8)
    self.grain = grain

  def paint(self, shape, colour, label: int, texture: float = 0.05):
    if shape is None:
      return
    sl, m = shape
    col = np.asarray(colour, np.float32)
    g = 1.0 + texture * self.grain[sl][..., None]
    region = self.img[sl]
    region[m] = (col * g)[m] if col.ndim == 3 else col[None, None, :] * g[m]
    self.lab[sl][m] = label


def render(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray,
                                                                        float]:
  """One street scene: (image uint8 (H,W,3), label uint8 (H,W) ids 0..33, difficulty)."""
  H, W = height, width
  complexity = float(rng.uniform())
  # Pixel noise from its own stream, so the scene's draws do not depend on the resolution.
  pix = np.random.default_rng(rng.integers(2 ** 63))
  grain = pix.standard_normal((H, W)).astype(np.float32)
  cv = _Canvas(H, W, grain)
  hy = rng.uniform(0.36, 0.5) * H                 # horizon row
  vpx = rng.uniform(0.35, 0.65) * W               # vanishing point column
  unit = H - hy                                   # pixels per camera height at t = 1
  ys = np.arange(H, dtype=np.float32)[:, None] + 0.5
  xs = np.arange(W, dtype=np.float32)[None, :] + 0.5
  sun = rng.uniform(0.75, 1.15, 2)                # brightness of left / right facades
  exposure = rng.uniform(0.85, 1.1)

  # --- sky: vertical gradient + low-frequency clouds -------------------------------------
  top = np.array([rng.uniform(60, 110), rng.uniform(110, 150), rng.uniform(170, 230)],
                 np.float32)
  bottom = np.array([195, 205, 215], np.float32) * rng.uniform(0.9, 1.05)
  a = np.clip(ys / max(hy, 1.0), 0, 1)[..., None]
  sky = top * (1 - a) + bottom * a
  clouds = np.clip(smooth_noise(rng, H, W, 3, 6) * 1.3 + rng.uniform(-0.6, 0.3), 0, 1)
  sky = sky * (1 - 0.7 * clouds[..., None]) + 235 * 0.7 * clouds[..., None]
  cv.img[:] = sky
  cv.lab[:] = SKY

  # --- distant skyline at the horizon ---------------------------------------------------
  sk = np.abs(smooth_noise(rng, 1, W, 1, 24)[0]) * 0.10 * H + 0.02 * H
  far = (ys < hy) & (ys > hy - sk[None, :])
  cv.img[far] = np.array([150, 150, 160], np.float32) * rng.uniform(0.8, 1.0)
  cv.lab[far] = BUILDING

  # --- ground: road and sidewalks in world coordinates (u lateral, t = 1/depth) -----------
  road_l, road_r = rng.uniform(1.2, 2.6), rng.uniform(1.2, 2.6)
  side_l, side_r = rng.uniform(0.8, 2.2), rng.uniform(0.8, 2.2)
  out_l, out_r = road_l + side_l, road_r + side_r
  below = ys > hy
  t = np.where(below, (ys - hy) / unit, 1.0)
  t = np.maximum(t, 1e-4)
  u = (xs - vpx) / (t * unit)                     # lateral position on the ground
  z = 1.0 / t                                     # depth
  road = below & (u >= -road_l) & (u <= road_r)
  walk = below & ~road & (u >= -out_l) & (u <= out_r)
  asphalt = rng.uniform(75, 105)
  road_col = np.full((H, W, 3), asphalt, np.float32) * (
      1 + 0.08 * smooth_noise(rng, H, W, 4, 8)[..., None])
  # Lane marks: dashed centre line, solid edge lines, sometimes a zebra crossing.
  centre = rng.uniform(-0.3, 0.3) * (road_l + road_r) / 2 + (road_r - road_l) / 2
  dash = (np.abs(u - centre) < 0.06) & (np.mod(z * rng.uniform(0.25, 0.4), 1.0) < 0.5)
  edges = (np.abs(u + road_l - 0.15) < 0.04) | (np.abs(u - road_r + 0.15) < 0.04)
  marks = road & (dash | edges) & (t > 0.04)
  if rng.uniform() < 0.4:
    zc = rng.uniform(1.5, 5.0)
    zebra = (z > zc) & (z < zc + 0.8) & (np.mod(u * 1.6, 1.0) < 0.5)
    marks |= road & zebra
  road_col[marks] = 215
  cv.img[road] = road_col[road]
  cv.lab[road] = ROAD
  paving = rng.uniform(140, 185) * np.array([1.0, 0.97, 0.92], np.float32)
  tiles = (np.mod(u * 2.0, 1.0) < 0.06) | (np.mod(z * 2.0, 1.0) < 0.06 * t * 4)
  curb = (np.abs(u + road_l) < 0.12) | (np.abs(u - road_r) < 0.12)
  walk_col = paving[None, None, :] * (1 - 0.15 * tiles[..., None] + 0.12 * curb[..., None])
  cv.img[walk] = walk_col[walk]
  cv.lab[walk] = SIDEWALK
  # Terrain strip at the outer edge of a sidewalk, sometimes.
  for sgn, out, side in ((-1, out_l, side_l), (1, out_r, side_r)):
    if rng.uniform() < 0.3:
      strip = walk & (sgn * u > out - 0.35 * side)
      cv.img[strip] = np.array([110, 140, 70], np.float32) * (1 + 0.1 * grain[strip][:, None])
      cv.lab[strip] = TERRAIN

  # --- facades: buildings on both sides, split into segments along the depth -----------
  glass_noise = np.clip(smooth_noise(rng, H, W, 2, 4), 0, 1)[..., None]
  split_col = int(np.clip(round(vpx), 0, W))
  for sgn, out, bright in ((-1, out_l, sun[0]), (1, out_r, sun[1])):
    cols = slice(0, split_col) if sgn < 0 else slice(split_col, W)   # this side's columns
    xc = xs[:, cols]
    if xc.size == 0:
      rng.uniform(size=(5, 41)); rng.uniform(size=3)     # keep the draw count fixed
      continue
    tf = np.maximum(sgn * (xc - vpx) / (out * unit), 1e-4) * np.ones_like(ys)  # facade depth
    hgt = 1 - (ys - hy) / (tf * unit)             # height above ground, camera heights
    zf = 1.0 / tf
    edges_z = np.cumsum(rng.uniform(0.6, 3.5, 40)) - rng.uniform(0, 1.5)
    seg = np.searchsorted(edges_z, zf)            # segment id per pixel
    n = len(edges_z) + 1
    heights = rng.uniform(3, 11, n) * (rng.uniform(size=n) > 0.06)
    colours = _FACADE_COLOURS[rng.integers(len(_FACADE_COLOURS), size=n)] * rng.uniform(
        0.8, 1.1, (n, 1))
    floor_h = rng.uniform(1.6, 2.4, n)
    win_z = rng.uniform(0.35, 0.9, n)
    facade = (hgt >= 0) & (hgt <= heights[seg]) & (zf < 60)
    col = colours[seg] * bright
    fh = hgt / floor_h[seg]
    wz = zf / win_z[seg]
    window = (np.mod(fh, 1) > 0.35) & (np.mod(fh, 1) < 0.8) & (np.mod(wz, 1) > 0.3) & (
        np.mod(wz, 1) < 0.75) & (hgt > 1.2) & (hgt < heights[seg] - 0.5) & (tf > 0.05)
    glass = np.array([55, 65, 80], np.float32) + 60 * glass_noise[:, cols]
    col = np.where(window[..., None], glass * bright, col)
    # Segment borders darker (gaps between houses), vertical shading towards the ground.
    col = col * (1 - 0.25 * (np.mod(zf - edges_z[np.minimum(seg, n - 2)], 1e9) < 0.08)[..., None])
    col = col * (0.85 + 0.15 * np.clip(hgt / 4, 0, 1))[..., None]
    img_side, lab_side = cv.img[:, cols], cv.lab[:, cols]
    img_side[facade] = col[facade]
    lab_side[facade] = BUILDING
    if rng.uniform() < 0.35:                      # a low wall or fence along the sidewalk
      fence = (hgt >= 0) & (hgt < 0.7) & (zf < 25)
      is_fence = rng.uniform() < 0.5
      if is_fence:
        fence &= (np.mod(zf * 6, 1) < 0.3) | (hgt > 0.6)
      img_side[fence] = (np.array([120, 110, 100], np.float32) * bright if is_fence
                         else np.array([160, 155, 150], np.float32) * bright)
      lab_side[fence] = FENCE if is_fence else WALL

  # --- objects, far (small t) to near -----------------------------------------------------
  objs = []
  n_cars = rng.poisson(1.0 + 7.0 * complexity)
  n_people = rng.poisson(0.5 + 7.0 * complexity)
  n_poles = rng.poisson(1.0 + 5.0 * complexity)
  n_trees = rng.poisson(0.8 + 4.0 * complexity)
  n_riders = rng.poisson(2.0 * complexity)
  for _ in range(n_cars):
    parked = rng.uniform() < 0.5
    if parked:
      uu = -road_l + 0.75 if rng.uniform() < 0.5 else road_r - 0.75
    else:
      uu = rng.uniform(-road_l + 0.9, road_r - 0.9)
    objs.append(('car', rng.uniform(0.05, 1.1), uu))
  for _ in range(n_people):
    left = rng.uniform() < 0.5
    uu = -rng.uniform(road_l + 0.2, out_l - 0.2) if left else rng.uniform(road_r + 0.2, out_r - 0.2)
    objs.append(('person', rng.uniform(0.05, 1.0), uu))
  for _ in range(n_riders):
    uu = -road_l + 0.5 if rng.uniform() < 0.5 else road_r - 0.5
    objs.append(('rider', rng.uniform(0.08, 0.9), uu))
  for _ in range(n_poles):
    uu = -(road_l + 0.3) if rng.uniform() < 0.5 else road_r + 0.3
    objs.append(('pole', rng.uniform(0.05, 0.9), uu))
  for _ in range(n_trees):
    uu = -(road_l + side_l * 0.6) if rng.uniform() < 0.5 else road_r + side_r * 0.6
    objs.append(('tree', rng.uniform(0.05, 0.8), uu))
  objs.sort(key=lambda o: o[1])
  for kind, tt, uu in objs:
    _DRAW[kind](cv, rng, tt, uu, hy, vpx, unit, sun)

  # --- ego vehicle hood at the bottom (as in Cityscapes), sometimes ----------------------
  if rng.uniform() < 0.5:
    e = rng.uniform(0.04, 0.1) * H
    hood = ys > H - e + 0.6 * e * ((xs - W / 2) / (W / 2)) ** 2
    shade = (1.4 - 0.5 * np.clip((ys - (H - e)) / e, 0, 1)) * np.ones_like(xs)
    cv.img[hood] = np.array([40, 42, 48], np.float32) * shade[hood][:, None]
    cv.lab[hood] = EGO

  # --- sensor: exposure, vignette, noise ---------------------------------------------------
  vig = 1 - 0.18 * (((xs - W / 2) / W) ** 2 + ((ys - H / 2) / H) ** 2)
  img = cv.img * exposure * vig[..., None] + pix.normal(0, 3.0, (H, W, 3))
  image = np.clip(img, 0, 255).astype(np.uint8)
  lab = cv.lab
  boundary = np.mean((lab[:, 1:] != lab[:, :-1])[:-1] | (lab[1:, :] != lab[:-1, :])[:, :-1])
  difficulty = 0.5 * complexity + 0.5 * min(1.0, float(boundary) / 0.12)
  return image, lab, float(difficulty)


def _px(hy, vpx, unit, t, u, h):
  """World (t, lateral u, height h in camera heights) -> image (x, y) pixels."""
  return vpx + u * t * unit, hy + t * unit * (1 - h)


def _car(cv, rng, t, u, hy, vpx, unit, sun):
  big = rng.uniform()
  label = CAR if big < 0.85 else (TRUCK if big < 0.93 else BUS)
  wdt, hgt = (1.2, 1.0) if label == CAR else (1.6, rng.uniform(2.0, 2.5))
  length = 3.0 if label == CAR else 6.0
  colour = _CAR_COLOURS[rng.integers(len(_CAR_COLOURS))] * rng.uniform(0.85, 1.1)
  if label == BUS:
    colour = np.array([rng.uniform(150, 230), rng.uniform(20, 180), 40], np.float32)
  x0, yb = _px(hy, vpx, unit, t, u - wdt / 2, 0)
  x1, _ = _px(hy, vpx, unit, t, u + wdt / 2, 0)
  _, ytop = _px(hy, vpx, unit, t, u, hgt)
  _, ymid = _px(hy, vpx, unit, t, u, hgt * (0.55 if label == CAR else 0.85))
  # Shadow on the road, then the side face (towards the vanishing point), then the rear.
  shadow = raster.ellipse(cv.h, cv.w, (x0 + x1) / 2, yb, (x1 - x0) * 0.62, (yb - ymid) * 0.15 + 0.5)
  if shadow is not None:
    cv.img[shadow[0]][shadow[1]] *= 0.55
  t2 = 1.0 / (1.0 / t + length)
  side_u = u + wdt / 2 if u < 0 else u - wdt / 2  # the side facing the image centre
  if side_u * u > 0:                              # visible only if it faces the camera
    near_x = x1 if u < 0 else x0
    body_h = hgt * 0.55 if label == CAR else hgt * 0.85
    sx, sy = _px(hy, vpx, unit, t2, side_u, 0)
    _, sy_mid = _px(hy, vpx, unit, t2, side_u, body_h)
    shade = 0.7 * sun[0 if u > 0 else 1]
    cv.paint(raster.polygon(cv.h, cv.w, [(near_x, yb), (near_x, ymid), (sx, sy_mid), (sx, sy)]),
             colour * shade, label)
    ins = 0.12 * (x1 - x0) * np.sign(-u)
    _, sy_top = _px(hy, vpx, unit, t2, side_u, hgt)
    sx_top = sx + ins * t2 / t
    cv.paint(raster.polygon(cv.h, cv.w, [(near_x, ymid), (near_x + ins, ytop), (sx_top, sy_top),
                                         (sx, sy_mid)]),
             colour * shade * (0.9 if label == CAR else 1.0), label)
    if label == CAR:
      f = lambda a, b, k: a + (b - a) * k          # noqa: E731 (side windows)
      k0, k1 = 0.15, 0.7
      cv.paint(raster.polygon(cv.h, cv.w, [
          (f(near_x, sx, k0), f(ymid, sy_mid, k0) - 0.1 * (ymid - ytop)),
          (f(near_x + ins, sx_top, k0), f(ytop, sy_top, k0) + 0.2 * (ymid - ytop)),
          (f(near_x + ins, sx_top, k1), f(ytop, sy_top, k1) + 0.2 * (ymid - ytop) * (1 - k1)),
          (f(near_x, sx, k1), f(ymid, sy_mid, k1) - 0.1 * (ymid - ytop) * (1 - k1))]),
               (45, 50, 60), label, 0.1)
      for k in (0.2, 0.8):                        # side wheels
        wx, wy = f(near_x, sx, k), f(yb, sy, k)
        rr = 0.28 * unit * (t + (t2 - t) * k)
        cv.paint(raster.ellipse(cv.h, cv.w, wx, wy - 0.6 * rr, 0.45 * rr, 0.7 * rr), (20, 20, 22),
                 label, 0.1)
  cv.paint(raster.rect(cv.h, cv.w, x0, ymid, x1, yb), colour, label)
  if label == CAR:                                # cabin with a dark rear window
    ins = 0.12 * (x1 - x0)
    cabin = raster.polygon(cv.h, cv.w, [(x0 + 0.04 * (x1 - x0), ymid), (x1 - 0.04 * (x1 - x0), ymid),
                                        (x1 - ins, ytop), (x0 + ins, ytop)])
    cv.paint(cabin, colour * 0.9, label)
    glass = raster.polygon(cv.h, cv.w, [(x0 + 0.1 * (x1 - x0), ymid - 0.05 * (ymid - ytop)),
                                        (x1 - 0.1 * (x1 - x0), ymid - 0.05 * (ymid - ytop)),
                                        (x1 - ins - 0.05 * (x1 - x0), ytop + 0.2 * (ymid - ytop)),
                                        (x0 + ins + 0.05 * (x1 - x0), ytop + 0.2 * (ymid - ytop))])
    cv.paint(glass, (45, 50, 60), label, 0.1)
  else:                                           # windows band
    band = raster.rect(cv.h, cv.w, x0 + 0.06 * (x1 - x0), ytop + 0.15 * (yb - ytop),
                       x1 - 0.06 * (x1 - x0), ytop + 0.4 * (yb - ytop))
    cv.paint(band, (40, 45, 55), label, 0.1)
  lh = 0.12 * (yb - ymid)
  for lx in (x0 + 0.04 * (x1 - x0), x1 - 0.16 * (x1 - x0)):  # tail lights
    cv.paint(raster.rect(cv.h, cv.w, lx, ymid + 1.5 * lh, lx + 0.12 * (x1 - x0), ymid + 2.5 * lh),
             (200, 30, 30), label, 0.1)
  ww = 0.18 * (x1 - x0)
  for wx in (x0 + 0.05 * (x1 - x0), x1 - 0.05 * (x1 - x0) - ww):  # tyres
    cv.paint(raster.rect(cv.h, cv.w, wx, yb - 0.18 * (yb - ymid), wx + ww, yb + 0.02 * unit * t),
             (20, 20, 22), label, 0.1)


def _person(cv, rng, t, u, hy, vpx, unit, sun, label=PERSON, base_h=0.0):
  hgt = rng.uniform(1.0, 1.25)
  s = t * unit                                    # pixels per camera height here
  cx, yb = _px(hy, vpx, unit, t, u, base_h)
  top = yb - hgt * s
  shirt = _CLOTHES[rng.integers(len(_CLOTHES))]
  trousers = _CLOTHES[rng.integers(len(_CLOTHES))] * 0.7
  skin = _SKIN[rng.integers(len(_SKIN))]
  step = rng.uniform(-0.08, 0.08) * s
  if label == PERSON:                             # legs
    for dx in (-0.06, 0.06):
      cv.paint(raster.line(cv.h, cv.w, cx + dx * s, yb - 0.5 * hgt * s, cx + dx * s + step * np.sign(dx),
                           yb, 0.09 * s), trousers, label)
  torso = raster.polygon(cv.h, cv.w, [(cx - 0.13 * s, top + 0.17 * hgt * s),
                                      (cx + 0.13 * s, top + 0.17 * hgt * s),
                                      (cx + 0.11 * s, top + 0.55 * hgt * s),
                                      (cx - 0.11 * s, top + 0.55 * hgt * s)])
  cv.paint(torso, shirt, label)
  for dx in (-0.15, 0.15):                        # arms
    cv.paint(raster.line(cv.h, cv.w, cx + dx * s, top + 0.2 * hgt * s, cx + dx * 1.2 * s,
                         top + 0.5 * hgt * s, 0.06 * s), shirt * 0.9, label)
  cv.paint(raster.ellipse(cv.h, cv.w, cx, top + 0.08 * hgt * s, 0.075 * s, 0.09 * s), skin, label)
  cv.paint(raster.ellipse(cv.h, cv.w, cx, top + 0.04 * hgt * s, 0.078 * s, 0.05 * s),
           (40, 30, 20) if rng.uniform() < 0.7 else (170, 140, 90), label)


def _rider(cv, rng, t, u, hy, vpx, unit, sun):
  s = t * unit
  cx, yb = _px(hy, vpx, unit, t, u, 0)
  r = 0.22 * s
  frame = (40, 40, 45) if rng.uniform() < 0.5 else (150, 30, 30)
  for dx in (-0.35, 0.35):                        # seen from the side: two wheels + frame
    cv.paint(raster.ring(cv.h, cv.w, cx + dx * s, yb - r, r, 0.04 * s), (25, 25, 25), BICYCLE)
  cv.paint(raster.line(cv.h, cv.w, cx - 0.35 * s, yb - r, cx, yb - 2.2 * r, 0.04 * s), frame, BICYCLE)
  cv.paint(raster.line(cv.h, cv.w, cx, yb - 2.2 * r, cx + 0.35 * s, yb - r, 0.04 * s), frame, BICYCLE)
  _person(cv, rng, t, u, hy, vpx, unit, sun, label=RIDER, base_h=0.35)


def _pole(cv, rng, t, u, hy, vpx, unit, sun):
  s = t * unit
  hgt = rng.uniform(2.5, 4.5)
  cx, yb = _px(hy, vpx, unit, t, u, 0)
  top = yb - hgt * s
  grey = np.array([110, 110, 115], np.float32) * rng.uniform(0.8, 1.2)
  cv.paint(raster.rect(cv.h, cv.w, cx - 0.04 * s, top, cx + 0.04 * s, yb, min_px=1.0), grey, POLE)
  kind = rng.uniform()
  if kind < 0.45:                                 # traffic sign: disc, triangle-ish or square
    r = 0.22 * s
    col = [(200, 30, 30), (30, 80, 170), (230, 200, 40)][rng.integers(3)]
    if rng.uniform() < 0.5:
      cv.paint(raster.ellipse(cv.h, cv.w, cx, top + r, r, r), (235, 235, 235), SIGN)
      cv.paint(raster.ellipse(cv.h, cv.w, cx, top + r, 0.75 * r, 0.75 * r), col, SIGN)
    else:
      cv.paint(raster.rect(cv.h, cv.w, cx - r, top, cx + r, top + 2 * r), col, SIGN)
      cv.paint(raster.rect(cv.h, cv.w, cx - 0.6 * r, top + 0.4 * r, cx + 0.6 * r, top + 1.6 * r),
               (235, 235, 235), SIGN)
  elif kind < 0.8:                                # traffic light: dark box with three lamps
    bw, bh = 0.12 * s, 0.55 * s
    cv.paint(raster.rect(cv.h, cv.w, cx - bw, top, cx + bw, top + bh, min_px=1.0), (30, 32, 30), LIGHT)
    on = rng.integers(3)
    for k, lamp in enumerate([(230, 40, 30), (240, 180, 30), (40, 220, 90)]):
      col = lamp if k == on else tuple(0.3 * c for c in lamp)
      cv.paint(raster.ellipse(cv.h, cv.w, cx, top + (k + 0.5) * bh / 3, 0.7 * bw, 0.7 * bw), col, LIGHT)
  else:                                           # street lamp arm
    cv.paint(raster.line(cv.h, cv.w, cx, top, cx - np.sign(u) * 0.8 * s, top + 0.1 * s, 0.05 * s),
             grey, POLE)


def _tree(cv, rng, t, u, hy, vpx, unit, sun):
  s = t * unit
  cx, yb = _px(hy, vpx, unit, t, u, 0)
  hgt = rng.uniform(2.0, 4.0)
  cv.paint(raster.rect(cv.h, cv.w, cx - 0.07 * s, yb - hgt * 0.6 * s, cx + 0.07 * s, yb, min_px=1.0),
           (80, 60, 40), VEGETATION)
  green = np.array([rng.uniform(50, 90), rng.uniform(90, 130), rng.uniform(30, 60)], np.float32)
  r = rng.uniform(0.7, 1.3) * s
  for _ in range(rng.integers(4, 8)):             # canopy: a union of blobs
    ox, oy = rng.normal(0, 0.45) * r, rng.normal(0, 0.3) * r
    rr = r * rng.uniform(0.5, 0.8)
    cv.paint(raster.ellipse(cv.h, cv.w, cx + ox, yb - hgt * s + oy, rr, rr * 0.9),
             green * rng.uniform(0.8, 1.2), VEGETATION, 0.25)


_DRAW = {'car': _car, 'person': _person, 'rider': _rider, 'pole': _pole, 'tree': _tree}

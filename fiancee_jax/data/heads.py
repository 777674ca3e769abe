"""`synthetic_heads`: a small numpy ray-caster of procedural heads with pose and expression.

The head is an ellipsoid (face shape = its radii) with a nose ellipsoid, two ear ellipsoids
and a hair shell; all are rotated by the pose (yaw, pitch, roll in degrees) and ray-cast
orthographically, so yaw moves the features sideways and foreshortens the far side, and
the nose occludes the far cheek. Eyes (iris, pupil, gaze), eyebrows and the mouth are
painted on the head surface in its own angular coordinates; expression parameters move
them (mouth open, smile, brow raise, per-eye blink, gaze). Lambert shading with a light
fixed per identity, so a frame is a pure function of (identity params, pose, expression):
the cross-reenactment target (source identity with the driver's pose and expression) is
rendered exactly, not approximated.

Expression vector (EXPR_DIM = 7): mouth_open [0,1], smile [-1,1], brow_raise [-1,1],
blink_left [0,1], blink_right [0,1], gaze_x [-1,1], gaze_y [-1,1].
"""
from __future__ import annotations

from typing import Any

import numpy as np

EXPR_DIM = 7
EXPRESSION_NAMES = ('mouth_open', 'smile', 'brow_raise', 'blink_left', 'blink_right',
                    'gaze_x', 'gaze_y')
POSE_RANGE_DEG = (40.0, 20.0, 15.0)   # |yaw|, |pitch|, |roll| maxima

_SKINS = np.array([(250, 220, 195), (235, 195, 160), (215, 170, 130), (180, 130, 90),
                   (140, 95, 60), (100, 65, 40)], np.float32)
_HAIRS = np.array([(25, 20, 18), (70, 45, 25), (120, 80, 40), (200, 165, 100),
                   (160, 70, 30), (150, 150, 150), (235, 225, 200)], np.float32)
_EYES = np.array([(70, 45, 25), (40, 90, 140), (70, 110, 60), (110, 100, 60), (30, 25, 20)],
                 np.float32)
_SHIRTS = np.array([(40, 60, 120), (150, 30, 40), (30, 30, 35), (220, 220, 215),
                    (60, 120, 80), (200, 150, 40), (110, 110, 120)], np.float32)


def split_identities(num_identities: int) -> dict[str, list[int]]:
  """Identity ids of each split: ~10% test, ~10% validation (>= 1 each when there are >= 3
  identities), the rest train. Disjoint, so evaluation uses unseen identities."""
  ids = list(range(num_identities))
  k = max(1, round(0.1 * num_identities)) if num_identities >= 3 else 0
  n_train = num_identities - 2 * k
  return {'train': ids[:n_train], 'validation': ids[n_train:n_train + k],
          'test': ids[n_train + k:]}


def identity_params(seed: int, identity: int) -> dict[str, Any]:
  """Appearance of one identity (skin, hair colour/shape, eyes, face shape, light, ...)."""
  r = np.random.default_rng([int(seed), 11, int(identity)])
  skin = _SKINS[r.integers(len(_SKINS))] * r.uniform(0.92, 1.05)
  return dict(
      skin=skin,
      hair=_HAIRS[r.integers(len(_HAIRS))] * r.uniform(0.85, 1.1),
      eye=_EYES[r.integers(len(_EYES))],
      shirt=_SHIRTS[r.integers(len(_SHIRTS))],
      lips=skin * np.array([0.85, 0.55, 0.55]) + np.array([30, 0, 0]),
      radii=np.array([r.uniform(0.36, 0.44), r.uniform(0.48, 0.56), r.uniform(0.40, 0.46)]),
      hairline=r.uniform(0.25, 0.55),      # higher = more forehead
      hair_volume=r.uniform(1.03, 1.12),
      long_hair=bool(r.uniform() < 0.4),
      bald=bool(r.uniform() < 0.08),
      nose=r.uniform(0.8, 1.25),
      mouth_width=r.uniform(0.22, 0.32),
      eye_sep=r.uniform(0.4, 0.48),
      brow_thick=r.uniform(0.025, 0.05),
      light=_unit(np.array([r.uniform(-0.7, 0.7), r.uniform(0.1, 0.8), 1.0])),
      background=(r.uniform(40, 220, 3), r.uniform(40, 220, 3)),
  )


def _unit(v: np.ndarray) -> np.ndarray:
  return v / np.linalg.norm(v)


def frame_params(seed: int, identity: int, frame: int) -> tuple[np.ndarray, np.ndarray]:
  """(pose degrees (3,), expression (EXPR_DIM,)) of one frame, float32."""
  r = np.random.default_rng([int(seed), 13, int(identity), int(frame)])
  pose = r.uniform(-1, 1, 3) * np.array(POSE_RANGE_DEG)
  blink = r.uniform() < 0.15
  both = r.uniform() < 0.8
  expr = np.array([
      max(0.0, r.uniform(-0.4, 1.0)),                   # mouth open
      r.uniform(-1, 1),                                 # smile
      r.uniform(-1, 1),                                 # brow raise
      r.uniform(0.7, 1.0) if blink else r.uniform(0, 0.2),
      0.0, r.uniform(-1, 1), r.uniform(-1, 1)])
  expr[4] = expr[3] if both else r.uniform(0, 0.2)
  return pose.astype(np.float32), expr.astype(np.float32)


def rotation(pose_deg: np.ndarray) -> np.ndarray:
  """Head -> camera rotation R = Rz(roll) Ry(yaw) Rx(pitch); x right, y up, z to viewer."""
  yaw, pitch, roll = np.deg2rad(np.asarray(pose_deg, np.float64))
  cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(
      roll), np.sin(roll)
  ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
  rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
  return rz @ ry @ rx


def _cast(px, py, rot, head_center, center, radii):
  """Ray-cast an ellipsoid given in head coordinates (centre, radii) along -z.
  Returns (hit, z, q) with q the hit point relative to the ellipsoid centre (head coords)."""
  rt = rot.T
  cam_c = rot @ center + head_center              # ellipsoid centre in camera coords
  rel = np.stack([px - cam_c[0], py - cam_c[1], np.zeros_like(px)], -1)
  q0 = rel @ rt.T                                 # head coords at z = 0
  d = rt[:, 2]                                    # head-coords direction of +z
  inv = 1.0 / np.asarray(radii) ** 2
  a = np.sum(d * d * inv)
  b = 2 * np.sum(q0 * d * inv, -1)
  c = np.sum(q0 * q0 * inv, -1) - 1
  disc = b * b - 4 * a * c
  hit = disc >= 0
  z = (-b + np.sqrt(np.maximum(disc, 0))) / (2 * a)
  q = q0 + z[..., None] * d
  return hit, np.where(hit, z + cam_c[2], -np.inf), q


def render(params: dict[str, Any], pose: np.ndarray, expr: np.ndarray, size: int
           ) -> tuple[np.ndarray, np.ndarray]:
  """(image uint8 (S,S,3), mask uint8 (S,S) in {0,255}) of one head."""
  s = size
  g = (np.arange(s, dtype=np.float64) + 0.5) / s * 2 - 1
  px, py = np.meshgrid(g, -g)                     # y up
  rot = rotation(pose)
  hc = np.array([0.0, 0.12, 0.0])                 # head centre in the image
  rad = params['radii']
  light = params['light']
  mouth_open, smile, brow, blink_l, blink_r, gaze_x, gaze_y = [float(v) for v in expr]

  # Background: a vertical gradient of two colours.
  top, bot = params['background']
  a = ((py + 1) / 2)[..., None]
  img = bot * (1 - a) + top * a
  zbuf = np.full((s, s), -np.inf)
  mask = np.zeros((s, s), bool)

  def put(hit, z, colour):
    nonlocal img
    m = hit & (z > zbuf)
    img = np.where(m[..., None], colour, img)
    zbuf[m] = z[m]
    mask[m] = True

  # Long hair: a sheet behind the head, rotating with roll and following yaw.
  if params['long_hair'] and not params['bald']:
    back = rot @ np.array([0, -0.15, -0.2]) + hc
    ang = np.deg2rad(pose[2])
    lx = (px - back[0]) * np.cos(ang) + (py - back[1]) * np.sin(ang)
    ly = -(px - back[0]) * np.sin(ang) + (py - back[1]) * np.cos(ang)
    sheet = ((lx / (rad[0] * 1.25)) ** 2 + (np.maximum(ly, 0) / (rad[1] * 1.1)) ** 2 <= 1) & (
        ly > -rad[1] * 1.35)
    put(sheet, np.full((s, s), -5.0), params['hair'] * 0.8)

  # Shoulders and neck (not rotated by yaw/pitch, as a torso would stay put).
  shoulders = ((px / 0.95) ** 2 + ((py + 1.25) / 0.45) ** 2) <= 1
  put(shoulders, np.full((s, s), -3.0), params['shirt'] * (0.8 + 0.2 * (py + 1)[..., None]))
  neck_x = rot[0, 1] * -0.4
  neck = (np.abs(px - neck_x * 0.5) < rad[0] * 0.42) & (py < hc[1] - 0.2) & (py > -0.95)
  put(neck, np.full((s, s), -2.0), params['skin'] * 0.7)

  # Ears.
  for sx in (-1, 1):
    hit, z, q = _cast(px, py, rot, hc, np.array([sx * rad[0] * 0.97, -0.02, -0.02]),
                      np.array([0.05, 0.11, 0.07]))
    put(hit, z - 1e-3, params['skin'] * 0.8)

  # Head with a shaded skin surface and painted features.
  hit, z, q = _cast(px, py, rot, hc, np.zeros(3), rad)
  n = q / rad                                     # unit-sphere coords on the head
  normal = (q / rad ** 2) @ rot.T
  normal /= np.linalg.norm(normal, axis=-1, keepdims=True) + 1e-9
  shade = 0.5 + 0.6 * np.clip(normal @ light, 0, 1)
  col = params['skin'] * shade[..., None]
  th = np.arctan2(n[..., 0], n[..., 2])           # azimuth: 0 = facing the camera at yaw 0
  ph = np.arcsin(np.clip(n[..., 1], -1, 1))       # elevation
  front = n[..., 2] > 0
  # Cheeks.
  for sx in (-1, 1):
    blush = np.exp(-(((th - sx * 0.45) / 0.15) ** 2 + ((ph + 0.2) / 0.1) ** 2))
    col = col * (1 - 0.12 * blush[..., None]) + np.array([200, 90, 90]) * 0.12 * blush[..., None]
  # Eyes: white, iris + pupil following the gaze, lids closing with a blink.
  te, pe = params['eye_sep'], 0.14
  for sx, bl in ((-1, blink_l), (1, blink_r)):
    dx, dy = (th - sx * te) / 0.2, (ph - pe) / (0.1 * max(1 - bl, 0.08))
    white = front & (dx ** 2 + dy ** 2 <= 1)
    col = np.where(white[..., None], np.array([240, 240, 235]) * shade[..., None], col)
    ix, iy = (th - sx * te - 0.09 * gaze_x) / 0.095, (ph - pe - 0.04 * gaze_y) / 0.095
    iris = white & (ix ** 2 + iy ** 2 <= 1)
    col = np.where(iris[..., None], params['eye'] * shade[..., None], col)
    col = np.where((iris & (ix ** 2 + iy ** 2 <= 0.2))[..., None], np.array([10, 10, 12]), col)
    lid = front & (np.abs(dx) <= 1.05) & (np.abs(np.abs(dy) - 1) * 0.1 * max(1 - bl, 0.08) < 0.018)
    col = np.where(lid[..., None], params['skin'] * 0.45, col)
    # Brows.
    by = pe + 0.17 + 0.06 * brow - 0.6 * ((th - sx * te) ** 2)
    bw = front & (np.abs(th - sx * te) < 0.24) & (np.abs(ph - by) < params['brow_thick'])
    col = np.where(bw[..., None], params['hair'] * 0.7 * shade[..., None], col)
  # Mouth: lips along a curve (smile bends it), dark interior when open, teeth.
  mw, pm = params['mouth_width'], -0.5
  curve = pm + 0.09 * smile * ((th / mw) ** 2 - 0.5)
  inside = np.abs(th) < mw * (1 + 0.1 * smile)
  open_h = 0.015 + 0.11 * mouth_open
  interior = front & inside & (np.abs(ph - curve) < open_h * np.sqrt(np.clip(1 - (th / mw) ** 2, 0, 1)))
  lips = front & inside & ~interior & (np.abs(ph - curve) < open_h + 0.03 * np.sqrt(
      np.clip(1 - (th / mw) ** 2, 0, 1)))
  col = np.where(lips[..., None], params['lips'] * shade[..., None], col)
  col = np.where(interior[..., None], np.array([70, 20, 25]), col)
  if mouth_open > 0.25:
    teeth = interior & (ph > curve + open_h * 0.45)
    col = np.where(teeth[..., None], np.array([235, 235, 225]) * shade[..., None], col)
  # Hair cap on the head surface (front hairline higher than the back).
  if not params['bald']:
    cap = (n[..., 1] > params['hairline'] - 0.9 * np.clip(-n[..., 2], 0, 1)) | (n[..., 2] < -0.35)
    col = np.where(cap[..., None], params['hair'] * (0.6 + 0.4 * shade[..., None]), col)
  put(hit, z, col)

  # Hair volume: a bigger shell, kept only above the hairline plane.
  if not params['bald']:
    hv = params['hair_volume']
    hit, z, q = _cast(px, py, rot, hc, np.array([0, 0.03, -0.03]), rad * hv)
    nn = q / (rad * hv)
    keep = hit & (nn[..., 1] > params['hairline'] + 0.15 - 1.1 * np.clip(-nn[..., 2], 0, 1))
    normal = (q / (rad * hv) ** 2) @ rot.T
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True) + 1e-9
    sh = 0.45 + 0.55 * np.clip(normal @ light, 0, 1)
    put(keep, z, params['hair'] * sh[..., None])

  # Nose: a small ellipsoid in front of the face, with nostrils.
  ns = params['nose']
  ncen = np.array([0.0, -0.07, rad[2] * 0.88])
  nrad = np.array([0.045, 0.095, 0.08]) * ns
  hit, z, q = _cast(px, py, rot, hc, ncen, nrad)
  nn = q / nrad
  normal = (q / nrad ** 2) @ rot.T
  normal /= np.linalg.norm(normal, axis=-1, keepdims=True) + 1e-9
  sh = 0.5 + 0.6 * np.clip(normal @ light, 0, 1)
  ncol = params['skin'] * sh[..., None]
  nostril = (nn[..., 1] < -0.55) & (np.abs(np.abs(nn[..., 0]) - 0.45) < 0.25) & (nn[..., 2] > 0.2)
  ncol = np.where(nostril[..., None], params['skin'] * 0.35, ncol)
  put(hit & (nn[..., 2] > -0.2), z, ncol)

  image = np.clip(img, 0, 255).astype(np.uint8)
  return image, (mask * 255).astype(np.uint8)


def render_frame(seed: int, identity: int, frame: int, size: int) -> dict[str, np.ndarray]:
  """One dataset example: image, mask, pose, expression of (identity, frame)."""
  pose, expr = frame_params(seed, identity, frame)
  image, mask = render(identity_params(seed, identity), pose, expr, size)
  return {'image': image, 'mask': mask, 'pose': pose, 'expression': expr}


def render_target(seed: int, identity: int, pose: np.ndarray, expression: np.ndarray,
                  size: int) -> dict[str, np.ndarray]:
  """Cross-reenactment ground truth: `identity` rendered with another frame's pose/expression."""
  image, mask = render(identity_params(seed, identity), np.asarray(pose, np.float32),
                       np.asarray(expression, np.float32), size)
  return {'image': image, 'mask': mask}

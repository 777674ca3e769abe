"""Head-avatar inference inputs (Sec. 4.2): a (source, driver) pair of RGB files or data split
examples and the source identity (its frame bank guides the branches) -> route inputs
(source, driver (B, H, W, 3) in [-1, 1], identity (B,) int32); the adapter's
`infer_inputs()`. Also Fig. 10's data: the routes against the driver's head rotation."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fiancee_jax import workdir as wd
from fiancee_jax.backbones.megaportraits import frame_banks
from fiancee_jax.infer import inputs as infer_inputs
from fiancee_jax.infer.inputs import InferError, Request


def pair_inputs(config, workdir: str, *, source: str | None, driver: str | None,
                source_index: int | None, driver_index: int | None, identity: int | None,
                split: str = 'test') -> tuple[np.ndarray, np.ndarray, int, str]:
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
    src_img, ident = infer_inputs.read_image(source, config, 'source'), int(identity)
    s_name = infer_inputs.stem(source)
  else:
    imgs, ids, _ = infer_inputs.split_frames(config, workdir, split, [source_index],
                                             'source_index')
    src_img, ident, s_name = imgs[0], int(ids[0]), f'{split}{int(source_index)}'
    if identity is not None and int(identity) != ident:
      raise InferError(f'--identity={identity} but --source_index={source_index} is a frame of '
                       f'identity {ident}: drop --identity')
  if driver is not None:
    drv_img = infer_inputs.read_image(driver, config, 'driver')
    d_name = infer_inputs.stem(driver)
  else:
    drv_img = infer_inputs.split_frames(config, workdir, split, [driver_index],
                                        'driver_index')[0][0]
    d_name = f'{split}{int(driver_index)}'
  return src_img, drv_img, ident, f'{s_name}_by_{d_name}'


def check_identity(config, workdir: str, identity: int) -> None:
  """An identity of the data (every one has a frame bank), else InferError listing them."""
  ids = frame_banks.all_identities(config, wd.data_dir(config, workdir))
  if int(identity) not in ids:
    raise InferError(f'--identity={identity}: expected an identity of the {config.data.name} '
                     f'data with a frame bank, one of {ids}')


def rotation_data(banks: Any, motion: np.ndarray, identity: np.ndarray,
                  driver_pose: np.ndarray | None, exits_taken: np.ndarray) -> dict[str, Any]:
  """Fig. 10 inputs for head-avatar test rows: the driver's head rotation from frontal
  (ground-truth pose where the data has it, else the motion encoder's angles), the angle
  between the driver's key and the guiding bank frame's key (the motion encoder's angles of
  both; None without a bank), and the route each row took. motion (N, 3 + expr_dim)."""
  motion = np.asarray(motion, np.float32)
  gt = driver_pose is not None
  out = {'angle_source': 'ground-truth pose' if gt else 'motion encoder angles',
         'driver_angle': frame_banks.rotation_angle(driver_pose if gt else motion[:, :3]),
         'exits_taken': np.asarray(exits_taken).tolist(), 'key_angle': None}
  if banks is not None:
    keys = frame_banks.nearest_bank_keys(banks, motion, identity)
    out['key_angle'] = frame_banks.rotation_angle(motion[:, :3], keys[:, :3])
  return out


class HeadInputs(infer_inputs.BackboneInputs):
  report_kind = 'heads'

  def from_flags(self, workdir: str, flags: dict[str, Any]) -> Request:
    """--source / --source_index, --driver / --driver_index (of --split), --identity; loads
    only the source identity's frame bank."""
    c = self.config
    if infer_inputs.given(flags, ('label', 'index')):
      raise InferError(f'{c.name} is a head-avatar config: give --source/--source_index '
                       'and --driver/--driver_index, not --label/--index')
    split = flags.get('split', 'test')
    source, driver = flags.get('source'), flags.get('driver')
    si, di = flags.get('source_index'), flags.get('driver_index')
    src, drv, ident, name = pair_inputs(c, workdir, source=source, driver=driver,
                                        source_index=si, driver_index=di,
                                        identity=flags.get('identity'), split=split)
    check_identity(c, workdir, ident)
    inputs = (infer_inputs.to_pm1(src[None]), infer_inputs.to_pm1(drv[None]),
              np.asarray([ident], np.int32))
    return Request(inputs=inputs, name=name,
                   info={'identity': ident, 'source': source or f'{split}[{si}]',
                         'driver': driver or f'{split}[{di}]'},
                   bank_select={'identities': [ident]})

  def from_rows(self, workdir: str, rows: dict[str, Any]
                ) -> tuple[tuple[np.ndarray, ...], dict[str, Any]]:
    """(source, driver in [-1, 1], source identity) of the rows' (source, driver) examples;
    extras: the drivers' ground-truth pose (None when the data has none)."""
    n = len(rows['sources'])
    images, ids, pose = infer_inputs.split_frames(
        self.config, workdir, rows['data_split'],
        np.concatenate([rows['sources'], rows['drivers']]))
    inputs = (infer_inputs.to_pm1(images[:n]), infer_inputs.to_pm1(images[n:]), ids[:n])
    return inputs, {'driver_pose': None if pose is None else pose[n:]}

  def sample_columns(self, inputs: Sequence[np.ndarray], k: int, guide: Any
                     ) -> dict[str, Any]:
    """Source | driver | the guiding bank frame (Fig. 5)."""
    cols = [('source', np.asarray(inputs[0][:k])), ('driver', np.asarray(inputs[1][:k]))]
    if guide is not None:
      cols.append(('bank frame', np.asarray(guide)))
    return {'inputs': cols}

  def sweep_extras(self, pipeline: Any, rows: dict[str, Any], inputs: Sequence[np.ndarray],
                   extra: dict[str, Any], taken: np.ndarray, threshold: float
                   ) -> dict[str, Any]:
    """Fig. 10: 'rotation' (`rotation_data` of the test rows at the headline threshold)."""
    banks = pipeline.params.get('bank') if pipeline.use_bank else None
    rot = rotation_data(banks, rows['feats'], inputs[2], extra.get('driver_pose'), taken)
    return {'rotation': dict(rot, threshold=threshold)}



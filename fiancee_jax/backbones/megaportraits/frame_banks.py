"""The FIANCEE pipeline on the head-avatar backbone (Sec. 4.2, S1.2): frame banks and routes.

Frame bank (S1.2.1). The paper keeps, for the source subject, a database of 960 frames of that
subject that cover head rotations and expressions uniformly; a frame's key is what
MegaPortraits' encoders give for it (3 Euler angles + a 512-d expression vector), its value
the RGB frame. At inference FAISS finds the frame whose key is nearest to the driver's, and
that frame (resized) is concatenated to the input of every branch block.

Here: one bank per source identity in `<workdir>/bank/<identity>/`, a `fiancee_jax.bank` bank
with one class and a 1x1 key grid: key = `HeadAvatar.motion_code` (angles ++ expression) of
the frame by the trained EMA backbone, value = the frame (H, W, 3) in [-1, 1]; written
atomically with the bank manifest (backbone step, model hash, identity, which frames).
`build_bank.py` builds one for every identity of the data's splits (train identities guide
branch training; validation / test identities the predictor sets and inference).
  * synthetic_heads: `config.bank.frames_per_identity` frames rendered for the identity with
    poses and expressions drawn like the dataset's (uniform over the pose box), frame ids
    after the dataset's: no bank frame is a dataset frame, so self-reenactment training never
    retrieves its own driver frame (at inference the driver is another person).
  * other data (video_frames): the identity's frames in the prepared splits, reduced to
    `frames_per_identity` by farthest-point sampling of their keys (the bank builder's FPS).
A stage that sees several identities stacks their banks (`bank.stack`: class i = the i-th
identity) and each example searches its own source identity's frames (`retrieve_frame`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from tqdm.auto import tqdm

from fiancee_jax import config as cfg
from fiancee_jax import data as fdata
from fiancee_jax import workdir as wd
from fiancee_jax.backbones.megaportraits import model as megaportraits
from fiancee_jax.core import bank as bank_lib
from fiancee_jax.core import stages
from fiancee_jax.core.pipeline import PipelineError
from fiancee_jax.data import heads as heads_data

PyTree = Any
SPLITS = ('train', 'validation', 'test')


def dataset_frames(config, data_dir: str) -> dict[str, dict[int, list[int]]]:
  """{split: {identity: [example index]}} of a prepared dataset with an 'identity' field
  (reads every example once; synthetic_heads never needs it)."""
  from fiancee_jax.data.builders import DataError  # noqa: PLC0415 (heavy: tfds)
  out: dict[str, dict[int, list[int]]] = {}
  for split in SPLITS:
    try:
      src = fdata.source(config.data, split, data_dir)
    except DataError:  # a split the data does not have
      continue
    by_id: dict[int, list[int]] = {}
    for i in range(len(src)):
      by_id.setdefault(int(src[i]['identity']), []).append(i)
    out[split] = by_id
  return out


def split_identities(config, data_dir: str, split: str,
                     index: dict[str, dict[int, list[int]]] | None = None) -> list[int]:
  """Identity ids of a data split (synthetic_heads: without reading the data; otherwise from
  `index` = dataset_frames(...), computed when not given)."""
  if config.data.name == 'synthetic_heads':
    return list(heads_data.split_identities(config.data.num_identities)[split])
  index = dataset_frames(config, data_dir) if index is None else index
  return sorted(index.get(split, {}))


def all_identities(config, data_dir: str,
                   index: dict[str, dict[int, list[int]]] | None = None) -> list[int]:
  """Every identity of the train, validation and test splits (each gets a bank)."""
  if config.data.name != 'synthetic_heads' and index is None:
    index = dataset_frames(config, data_dir)
  return sorted({i for s in SPLITS for i in split_identities(config, data_dir, s, index)})


def frames_meta(config, identity: int,
                index: dict[str, dict[int, list[int]]] | None = None) -> dict:
  """What `identity_frames` offers to the identity's bank (recorded in its manifest)."""
  d = config.data
  if d.name == 'synthetic_heads':
    if not 0 <= int(identity) < d.num_identities:
      raise PipelineError(f'identity {identity}: synthetic_heads has identities '
                          f'0..{d.num_identities - 1}')
    first = int(d.frames_per_identity)  # after the dataset's frames 0..F-1
    return {'frames': 'rendered',
            'frame_ids': [first, first + int(config.bank.frames_per_identity)]}
  where = [(s, i) for s, by_id in (index or {}).items() for i in by_id.get(int(identity), [])]
  if not where:
    raise PipelineError(f'identity {identity}: no frames of it in the {d.name} splits')
  return {'frames': 'dataset', 'examples': [[s, i] for s, i in where]}


def identity_frames(config, data_dir: str, identity: int,
                    index: dict[str, dict[int, list[int]]] | None = None
                    ) -> tuple[np.ndarray, dict]:
  """(uint8 frames (N, H, W, 3) offered to `identity`'s bank, frames_meta). See the module
  docstring: rendered frames on synthetic_heads, the dataset's frames otherwise (`index` =
  dataset_frames(...))."""
  d = config.data
  meta = frames_meta(config, identity, index)
  if meta['frames'] == 'rendered':
    a, b = meta['frame_ids']
    return np.stack([heads_data.render_frame(d.seed, int(identity), f, d.height)['image']
                     for f in range(a, b)]), meta
  srcs = {s: fdata.source(d, s, data_dir) for s in {s for s, _ in meta['examples']}}
  return np.stack([np.asarray(srcs[s][i]['image'], np.uint8)
                   for s, i in meta['examples']]), meta


def motion_keys(model: megaportraits.HeadAvatar, gen_vars: PyTree, frames: jax.Array
                ) -> jax.Array:
  """Bank keys / predictor inputs (B, 3 + expr_dim) of frames in [-1, 1] (eval mode)."""
  return model.apply(gen_vars, frames, False, method='motion_code')['motion']


def identity_slots(identities: Sequence[int]) -> np.ndarray:
  """Lookup (max id + 1,) int32: identity -> its class in the stacked bank (-1: none)."""
  ids = np.asarray(list(identities), np.int64)
  if ids.size == 0 or ids.min() < 0 or len(set(ids.tolist())) != ids.size:
    raise PipelineError(f'identities {ids.tolist()}: expected distinct ids >= 0')
  table = np.full(int(ids.max()) + 1, -1, np.int32)
  table[ids] = np.arange(ids.size, dtype=np.int32)
  return table


def retrieve_frame(bank: bank_lib.Bank, slots: jax.Array, motion: jax.Array,
                   identity: jax.Array, backend: str = 'device') -> jax.Array:
  """The bank frame (B, H, W, 3) whose key is nearest to each driver's motion key, among the
  frames of that example's source identity (an identity without a bank searches them all)."""
  cls = jnp.take(slots, jnp.asarray(identity, jnp.int32), mode='fill', fill_value=-1)
  return bank_lib.retrieve(bank, motion[:, None, None, :], cls[:, None, None], backend=backend)


def _motion_fn(model: megaportraits.HeadAvatar) -> Callable:
  return jax.jit(functools.partial(motion_keys, model))


def _bank_meta(config, identity: int, meta: dict) -> dict:
  return {'identity': int(identity), 'frames_per_identity': int(config.bank.frames_per_identity),
          'data': config.data.name, 'data_seed': int(config.data.seed), **meta}


def load_bank(config, shapes: dict, workdir: str, identity: int, backbone_step: int | None = None,
              verify: bool = True) -> bank_lib.Bank:
  """The frame bank of one identity, checked against this config (and the backbone step)."""
  path = wd.identity_bank_dir(workdir, identity)
  cmd = wd.stage_cmd(config, workdir, 'python build_bank.py')
  bank = stages.load_bank_at(config, workdir, path, shapes, backbone_step, verify,
                             f'frame bank for identity {identity}')
  meta = bank.manifest.get('meta', {})
  if meta.get('identity') != int(identity):
    raise PipelineError(f'{path} holds the bank of identity {meta.get("identity")}, expected '
                        f'{identity}: rebuild with `{cmd} --force`')
  return bank


@struct.dataclass
class FrameBanks:
  """Stacked frame banks of several identities: `bank` (class i = identities[i]) and the
  identity -> class lookup `slots` (pass both to `retrieve_frame`)."""
  bank: bank_lib.Bank
  slots: jax.Array                      # (max id + 1,) int32, -1: no bank
  identities: tuple[int, ...] = struct.field(pytree_node=False)


def load_banks(config, shapes: dict, workdir: str, identities: Sequence[int],
               backbone_step: int | None = None, verify: bool = True) -> FrameBanks:
  """The frame banks of `identities`, stacked (one PipelineError naming the first missing)."""
  ids = tuple(int(i) for i in identities)
  banks = [load_bank(config, shapes, workdir, i, backbone_step, verify) for i in ids]
  return FrameBanks(bank_lib.stack(banks), jnp.asarray(identity_slots(ids)), ids)


def _existing_bank_ok(config, shapes: dict, workdir: str, identity: int, step: int | None,
                      meta: dict) -> str | None:
  """None when the identity's bank is complete and built like this config asks; else why not."""
  try:
    bank = load_bank(config, shapes, workdir, identity, step, verify=True)
  except PipelineError as e:
    return str(e)
  want = _bank_meta(config, identity, meta)
  have = bank.manifest.get('meta', {})
  diff = sorted(k for k in want if have.get(k) != want[k])
  return None if not diff else f'bank built with other {", ".join(diff)}'


def build_bank(config, shapes: dict, workdir: str, gen_vars: PyTree, step: int | None, *,
               force: bool = False, batch_size: int = 16, progress: bool = True,
               identities: Sequence[int] | None = None) -> dict[int, dict]:
  """The bank stage for head avatars: a frame bank per identity (default: every identity of
  the data's splits) under `<workdir>/bank/<identity>`, keys by the trained backbone's motion
  encoder. Up-to-date banks are kept unless `force`. Returns {identity: manifest}."""
  if config.bank.frames_per_identity <= 0:
    raise PipelineError(f'config.bank.frames_per_identity={config.bank.frames_per_identity}: '
                        'expected > 0')
  data_dir = wd.data_dir(config, workdir)
  fdata.prepare(config.data, data_dir)
  index = None if config.data.name == 'synthetic_heads' else dataset_frames(config, data_dir)
  ids = (all_identities(config, data_dir, index) if identities is None
         else [int(i) for i in identities])
  if not ids:
    raise PipelineError(f'no identities in the {config.data.name} splits under {data_dir}')
  model = megaportraits.from_config(config)
  fn = _motion_fn(model)
  out, built = {}, 0
  for ident in tqdm(ids, desc='frame banks', unit='identity', disable=not progress):
    path = wd.identity_bank_dir(workdir, ident)
    if not force and _existing_bank_ok(config, shapes, workdir, ident, step,
                                       frames_meta(config, ident, index)) is None:
      out[ident] = bank_lib.load(path, verify=False).manifest
      continue
    frames, meta = identity_frames(config, data_dir, ident, index)

    def feature_fn(chunk):  # one compiled shape (bank.compute_batch), padding dropped
      (batch,), n = chunk
      x = np.asarray(batch, np.float32) / 127.5 - 1.0
      keys = np.asarray(fn(gen_vars, x))[:n]
      return keys[:, None, None, :], x[:n], None

    chunks = bank_lib.FixedChunks(
        ((frames[s:s + batch_size],) for s in range(0, len(frames), batch_size)),
        config.bank.compute_batch, num_inputs=len(frames))
    out[ident] = bank_lib.build(
        feature_fn, chunks, path, max_per_class=int(config.bank.frames_per_identity),
        num_classes=1, backbone_step=step, config_hash=cfg.config_hash(config),
        meta={**_bank_meta(config, ident, meta),
              'compute_batch': int(config.bank.compute_batch)}, progress=False)
    built += 1
  print(f'[bank] {wd.bank_dir(workdir)}: {built} frame banks built, {len(ids) - built} up '
        f'to date ({len(ids)} identities x <= {config.bank.frames_per_identity} frames), '
        f'backbone step {step}', flush=True)
  return out


def rotation_angle(angles_deg: np.ndarray, reference_deg: np.ndarray | None = None
                   ) -> np.ndarray:
  """Geodesic angle in degrees (N,) of the head rotation (yaw, pitch, roll) (N, 3) from
  frontal, or from `reference_deg` (N, 3) when given (Fig. 10: the driver's rotation, and
  its angle to the guiding bank frame)."""
  a = np.asarray(angles_deg, np.float64).reshape(-1, 3)
  b = np.zeros_like(a) if reference_deg is None else np.asarray(reference_deg,
                                                                 np.float64).reshape(-1, 3)
  out = []
  for x, y in zip(a, b):
    rel = heads_data.rotation(y).T @ heads_data.rotation(x)
    out.append(np.degrees(np.arccos(np.clip((np.trace(rel) - 1) / 2, -1.0, 1.0))))
  return np.asarray(out, np.float64)


def nearest_bank_keys(banks: FrameBanks, motion: np.ndarray, identity: np.ndarray) -> np.ndarray:
  """The bank key (N, D) retrieval picks for each driver key `motion` (N, D) among its source
  identity's frames (the guiding frame's key); `banks` = the adapter's loaded bank."""
  cls = np.asarray(banks.slots)[np.asarray(identity, np.int64)]
  idx = bank_lib.nearest(banks.bank, jnp.asarray(motion, jnp.float32), jnp.asarray(cls),
                         backend='device')
  return np.asarray(banks.bank.keys)[np.asarray(idx)]

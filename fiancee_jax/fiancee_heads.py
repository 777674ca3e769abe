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

Routes: the frozen backbone runs encode -> G2D input conv -> ResBlock2D 1..9 once; exit k
takes block k's output, the retrieved frame, and its branch (`all_images`, `exit_image`).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fiancee_jax.core import bank as bank_lib
from fiancee_jax import config as cfg
from fiancee_jax import fiancee
from fiancee_jax.models import branches as branches_lib
from fiancee_jax.backbones.megaportraits import model as megaportraits

PyTree = Any
PipelineError = fiancee.PipelineError
SPLITS = ('train', 'validation', 'test')


def _check_heads(config) -> None:
  if config.backbone != 'megaportraits':
    raise PipelineError(f'config.backbone={config.backbone!r}: fiancee_heads assembles the '
                        "'megaportraits' backbone only")


# ------------------------------------------------------------------------------ identities

def identity_bank_dir(workdir: str, identity: int) -> str:
  """`<workdir>/bank/<identity>`: the frame bank of one source identity."""
  return os.path.join(fiancee.bank_dir(workdir), str(int(identity)))


def dataset_frames(config, data_dir: str) -> dict[str, dict[int, list[int]]]:
  """{split: {identity: [example index]}} of a prepared dataset with an 'identity' field
  (reads every example once; synthetic_heads never needs it)."""
  from fiancee_jax import data as fdata  # noqa: PLC0415 (heavy: tfds)
  from fiancee_jax.data.builders import DataError  # noqa: PLC0415
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
    from fiancee_jax.data import heads  # noqa: PLC0415
    return list(heads.split_identities(config.data.num_identities)[split])
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
    from fiancee_jax.data import heads  # noqa: PLC0415
    a, b = meta['frame_ids']
    return np.stack([heads.render_frame(d.seed, int(identity), f, d.height)['image']
                     for f in range(a, b)]), meta
  from fiancee_jax import data as fdata  # noqa: PLC0415
  srcs = {s: fdata.source(d, s, data_dir) for s in {s for s, _ in meta['examples']}}
  return np.stack([np.asarray(srcs[s][i]['image'], np.uint8)
                   for s, i in meta['examples']]), meta


# ------------------------------------------------------------------------------ modules

def build_modules(config, use_bank: bool | None = None, axis_name: str | None = None
                  ) -> tuple[megaportraits.HeadAvatar, branches_lib.G2DBranches]:
  """(backbone, branches) modules of a head-avatar config (eval: axis_name None)."""
  _check_heads(config)
  return (megaportraits.from_config(config),
          branches_lib.g2d_branches_from_config(config, axis_name=axis_name, use_bank=use_bank))


def num_blocks(model: megaportraits.HeadAvatar) -> int:
  return model.num_res + len(model.up_channels)


def bank_shapes(config) -> dict[str, Any]:
  """Manifest fields a frame bank for this config must have."""
  d = config.data
  return {'grid': [1, 1], 'key_dim': 3 + int(config.model.expr_dim),
          'value_shape': [int(d.height), int(d.width), branches_lib.FRAME_CHANNELS],
          'num_classes': 1}


def init_branches(config, branches: branches_lib.G2DBranches, rng: jax.Array) -> PyTree:
  """Fresh branch variables, shaped by G2D's block features (batch 1, zeros)."""
  blocks = branches_lib.backbone_blocks(config)
  feats = {f'block{k}': jnp.zeros((1, blocks[k - 1].height, blocks[k - 1].width,
                                   blocks[k - 1].fout), jnp.float32) for k, _ in branches.specs}
  frame = (jnp.zeros((1, config.data.height, config.data.width, 3), jnp.float32)
           if branches.use_bank else None)
  return branches.init({'params': rng}, feats, frame, False)


# ------------------------------------------------------------------------------ forward

def motion_keys(model: megaportraits.HeadAvatar, gen_vars: PyTree, frames: jax.Array
                ) -> jax.Array:
  """Bank keys / predictor inputs (B, 3 + expr_dim) of frames in [-1, 1] (eval mode)."""
  return model.apply(gen_vars, frames, False, method='motion_code')['motion']


def backbone_forward(model: megaportraits.HeadAvatar, gen_vars: PyTree, source: jax.Array,
                     driver: jax.Array, exits: Sequence[int]
                     ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
  """(feats {'block{k}': output of block k for each exit}, motion (B, D), backbone image) of
  the frozen backbone in one pass (eval mode): the shared prefix is computed once."""
  def f(mdl, s, d):
    x, front = mdl.encode(s, d, False)
    x = mdl.input_conv(x)
    feats, start = {}, 0
    for k in sorted(exits):
      x = mdl.run_blocks(x, start, k, False)
      feats[f'block{k}'] = x
      start = k
    x = mdl.run_blocks(x, start, num_blocks(mdl), False)
    return feats, front['motion'], mdl.head(x)
  return model.apply(gen_vars, source, driver, method=f)


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


# ------------------------------------------------------------------------------ banks

def _motion_fn(model: megaportraits.HeadAvatar) -> Callable:
  return jax.jit(functools.partial(motion_keys, model))


def _bank_meta(config, identity: int, meta: dict) -> dict:
  return {'identity': int(identity), 'frames_per_identity': int(config.bank.frames_per_identity),
          'data': config.data.name, 'data_seed': int(config.data.seed), **meta}


def load_bank(config, workdir: str, identity: int, backbone_step: int | None = None,
              verify: bool = True) -> bank_lib.Bank:
  """The frame bank of one identity, checked against this config (and the backbone step)."""
  path = identity_bank_dir(workdir, identity)
  cmd = fiancee._stage_cmd(config, workdir, 'python build_bank.py')  # noqa: SLF001
  if not os.path.isfile(os.path.join(path, 'manifest.json')):
    raise PipelineError(f'no frame bank for identity {identity} in {path}: run `{cmd}`')
  expect = {'config_hash': cfg.config_hash(config), **bank_shapes(config)}
  if backbone_step is not None:
    expect['backbone_step'] = int(backbone_step)
  try:
    bank = bank_lib.load(path, expect=expect, verify=verify)
  except bank_lib.BankError as e:
    raise PipelineError(f'{e} (`{cmd} --force`)') from e
  meta = bank.manifest.get('meta', {})
  if meta.get('identity') != int(identity):
    raise PipelineError(f'{path} holds the bank of identity {meta.get("identity")}, expected '
                        f'{identity}: rebuild with `{cmd} --force`')
  return bank


@dataclasses.dataclass(frozen=True)
class FrameBanks:
  """Stacked frame banks of several identities: `bank` (class i = identities[i]) and the
  identity -> class lookup `slots` (pass both to `retrieve_frame`)."""
  bank: bank_lib.Bank
  slots: np.ndarray
  identities: tuple[int, ...]


def load_banks(config, workdir: str, identities: Sequence[int],
               backbone_step: int | None = None, verify: bool = True) -> FrameBanks:
  """The frame banks of `identities`, stacked (one PipelineError naming the first missing)."""
  ids = tuple(int(i) for i in identities)
  banks = [load_bank(config, workdir, i, backbone_step, verify) for i in ids]
  return FrameBanks(bank_lib.stack(banks), identity_slots(ids), ids)


def _existing_bank_ok(config, workdir: str, identity: int, step: int | None,
                      meta: dict) -> str | None:
  """None when the identity's bank is complete and built like this config asks; else why not."""
  try:
    bank = load_bank(config, workdir, identity, step, verify=True)
  except PipelineError as e:
    return str(e)
  want = _bank_meta(config, identity, meta)
  have = bank.manifest.get('meta', {})
  diff = sorted(k for k in want if have.get(k) != want[k])
  return None if not diff else f'bank built with other {", ".join(diff)}'


def build_bank(config, workdir: str, *, force: bool = False, batch_size: int = 16,
               progress: bool = True, identities: Sequence[int] | None = None
               ) -> dict[int, dict]:
  """The bank stage for head avatars: a frame bank per identity (default: every identity of
  the data's splits) under `<workdir>/bank/<identity>`, keys by the trained backbone's motion
  encoder. Up-to-date banks are kept unless `force`. Returns {identity: manifest}."""
  from tqdm.auto import tqdm  # noqa: PLC0415
  from fiancee_jax import data as fdata  # noqa: PLC0415 (heavy: tfds)
  _check_heads(config)
  cfg.validate(config)
  if batch_size <= 0:
    raise PipelineError(f'batch_size={batch_size}: expected > 0')
  if config.bank.frames_per_identity <= 0:
    raise PipelineError(f'config.bank.frames_per_identity={config.bank.frames_per_identity}: '
                        'expected > 0')
  g_params, g_coll, g_meta = fiancee._load_backbone(config, workdir)  # noqa: SLF001
  step = g_meta.get('step')
  data_dir = cfg.data_dir(config, workdir)
  fdata.prepare(config.data, data_dir)
  index = None if config.data.name == 'synthetic_heads' else dataset_frames(config, data_dir)
  ids = (all_identities(config, data_dir, index) if identities is None
         else [int(i) for i in identities])
  if not ids:
    raise PipelineError(f'no identities in the {config.data.name} splits under {data_dir}')
  model = megaportraits.from_config(config)
  gen_vars = {'params': g_params, **g_coll}
  fn = _motion_fn(model)
  out, built = {}, 0
  for ident in tqdm(ids, desc='frame banks', unit='identity', disable=not progress):
    path = identity_bank_dir(workdir, ident)
    if not force and _existing_bank_ok(config, workdir, ident, step,
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
  print(f'[bank] {fiancee.bank_dir(workdir)}: {built} frame banks built, {len(ids) - built} up '
        f'to date ({len(ids)} identities x <= {config.bank.frames_per_identity} frames), '
        f'backbone step {step}', flush=True)
  return out


# ------------------------------------------------------------------------------ pipeline

def frame_of(pipeline: fiancee.Pipeline, params: dict, motion: jax.Array, identity: jax.Array,
             backend: str | None = None) -> jax.Array | None:
  """The retrieved bank frame of each example (None when the branches are unguided)."""
  if not pipeline.use_bank:
    return None
  if params.get('bank') is None:
    raise PipelineError('guided branches need params["bank"]: load the pipeline with the '
                        "'bank' stage (build_bank.py)")
  return retrieve_frame(params['bank'], params['bank_slots'], motion, identity,
                        backend or pipeline.config.bank.backend)


def all_images(pipeline: fiancee.Pipeline, params: dict, source: jax.Array, driver: jax.Array,
               identity: jax.Array, backend: str | None = None) -> dict[Any, jax.Array]:
  """{k: image of exit k, ..., 'backbone': image, 'motion': driver keys, 'frame': retrieved
  frame (guided only)} in one pass: the backbone runs once, the frame is retrieved once."""
  feats, motion, image = backbone_forward(pipeline.generator, params['generator'], source,
                                          driver, pipeline.exits)
  frame = frame_of(pipeline, params, motion, identity, backend)
  out = pipeline.branches.apply(params['branches'], feats, frame, False)
  out = {**out, 'backbone': image, 'motion': motion}
  if frame is not None:
    out['frame'] = frame
  return out


def exit_image(pipeline: fiancee.Pipeline, params: dict, k: int, source: jax.Array,
               driver: jax.Array, identity: jax.Array, backend: str | None = None) -> jax.Array:
  """Image of the route through exit k only: encoders, G2D input conv + blocks 1..k, the
  retrieved frame, branch k."""
  if k not in pipeline.exits:
    raise PipelineError(f'exit {k}: this pipeline has exits {pipeline.exits}')

  def f(mdl, s, d):
    x, front = mdl.encode(s, d, False)
    return mdl.run_blocks(mdl.input_conv(x), 0, k, False), front['motion']
  x, motion = pipeline.generator.apply(params['generator'], source, driver, method=f)
  frame = frame_of(pipeline, params, motion, identity, backend)
  return pipeline.branches.apply(params['branches'], k, x, frame, False, method='exit')


def route_costs(config, use_bank: bool) -> np.ndarray:
  """GMACs (E+1,) of each route, exits then the backbone, counted like Table 2 (from G2D's
  input; the front end is shared by all routes) + the frame search bound when guided."""
  from fiancee_jax.metrics import flops  # noqa: PLC0415
  rows = []
  for r in megaportraits.exit_flops_routes(config, float(config.branches.sf), use_bank):
    rows.append(flops.count_macs(r.fn, *r.args) / 1e9 + r.extra.get('retrieval_gmacs', 0.0))
  bb = megaportraits._flops_routes(config)[0]  # noqa: SLF001 (the 'backbone' route)
  rows.append(flops.count_macs(bb.fn, *bb.args) / 1e9)
  return np.asarray(rows, np.float64)


def load_pipeline(config, workdir: str, stages: Sequence[str] = fiancee.STAGES,
                  use_bank: bool | None = None, identities: Sequence[int] | None = None,
                  verify_bank: bool = True) -> fiancee.Pipeline:
  """The trained head-avatar pipeline of `workdir` (see fiancee.load_pipeline). params gets
  'bank' (the stacked frame banks of `identities`, default every identity of the data) and
  'bank_slots' (identity -> class)."""
  _check_heads(config)
  unknown = sorted(set(stages) - set(fiancee.STAGES))
  if unknown:
    raise PipelineError(f'load_pipeline stages {unknown}: expected some of {fiancee.STAGES}')
  if 'backbone' not in stages:
    raise PipelineError("load_pipeline: the 'backbone' stage is always needed")
  use_bank = bool(config.branches.use_bank if use_bank is None else use_bank)
  gen, br = build_modules(config, use_bank=use_bank)
  g_params, g_coll, g_meta = fiancee._load_backbone(config, workdir)  # noqa: SLF001
  gen_vars = {'params': g_params, **g_coll}
  bank, slots = None, None
  if 'bank' in stages and use_bank:
    if identities is None:
      identities = all_identities(config, cfg.data_dir(config, workdir))
    fb = load_banks(config, workdir, identities, g_meta.get('step'), verify_bank)
    bank, slots = fb.bank, jnp.asarray(fb.slots)
  if 'branches' in stages:
    b_vars = fiancee.load_branches(config, workdir, use_bank, gen_vars)
  else:
    b_vars = jax.jit(functools.partial(init_branches, config, br))(
        jax.random.PRNGKey(config.seed))
  predictor, p_vars = None, None
  if 'predictor' in stages:
    predictor, p_vars = fiancee.load_predictor(config, workdir)
  params = {'generator': gen_vars, 'branches': b_vars, 'predictor': p_vars, 'bank': bank,
            'bank_slots': slots}
  return fiancee.Pipeline(config, gen, br, predictor, bank, params,
                          route_costs(config, use_bank), tuple(sorted(config.branches.exits)))


# ------------------------------------------------------------------------------ inference

def front_end(pipeline: fiancee.Pipeline, params: dict, source: jax.Array, driver: jax.Array,
              identity: jax.Array, backend: str | None = None) -> dict[str, Any]:
  """What every route shares (the routed prefix, Sec. 3.2): encoders + fusion -> G2D input
  'x', the driver's motion key 'motion' (predictor input) and the retrieved bank 'frame'
  (None when the branches are unguided)."""
  x, front = pipeline.generator.apply(params['generator'], source, driver, False,
                                      method='encode')
  return {'x': x, 'motion': front['motion'],
          'frame': frame_of(pipeline, params, front['motion'], identity, backend)}


def route_from_front(pipeline: fiancee.Pipeline, params: dict, route: int,
                     front: dict[str, Any]) -> jax.Array:
  """Image of route `route` (index into pipeline.exits, len(exits) = the backbone) from
  `front_end`'s output: G2D input conv + blocks 1..k + branch k, or all blocks + head."""
  exits = pipeline.exits
  stop = exits[route] if route < len(exits) else None

  def g2d(mdl, x):
    x = mdl.input_conv(x)
    if stop is None:
      return mdl.head(mdl.run_blocks(x, 0, num_blocks(mdl), False))
    return mdl.run_blocks(x, 0, stop, False)
  x = pipeline.generator.apply(params['generator'], front['x'], method=g2d)
  if stop is None:
    return x
  return pipeline.branches.apply(params['branches'], stop, x, front['frame'], False,
                                 method='exit')


def route_fns(pipeline: fiancee.Pipeline, backend: str | None = None
              ) -> list[Callable[[dict, jax.Array, jax.Array, jax.Array], jax.Array]]:
  """One jittable `fn(params, source, driver, identity) -> image` per exit (in order), then
  the backbone's; each computes only its own route (front end included)."""
  def fn(route, params, source, driver, identity):
    front = front_end(pipeline, params, source, driver, identity, backend)
    return route_from_front(pipeline, params, route, front)
  return [functools.partial(fn, r) for r in range(len(pipeline.exits) + 1)]


def predict_lpips(pipeline: fiancee.Pipeline, params: dict, driver: jax.Array) -> jax.Array:
  """Predicted LPIPS (B, E) of every exit from the driver alone (motion encoder + predictor)."""
  motion = motion_keys(pipeline.generator, params['generator'], driver)
  return pipeline.predictor.apply(params['predictor'], motion)


def routed_one(pipeline: fiancee.Pipeline, params: dict, source: jax.Array, driver: jax.Array,
               identity: jax.Array, threshold: jax.Array, costs: jax.Array,
               offset: jax.Array = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One (source, driver) pair end to end in one jittable call (`routing.routed_apply`): front
  end once -> predictor on the motion key -> `lax.switch` runs only the chosen route."""
  from fiancee_jax.core import routing  # noqa: PLC0415
  exit_fns = tuple(functools.partial(lambda r, p, f: route_from_front(pipeline, p, r, f), r)
                   for r in range(len(pipeline.exits) + 1))
  return routing.routed_apply(
      lambda p, x: front_end(pipeline, p, *x),
      lambda p, f: pipeline.predictor.apply(p['predictor'], f['motion'])[0],
      exit_fns, params, (source, driver, identity), threshold, costs, offset)


def rotation_angle(angles_deg: np.ndarray, reference_deg: np.ndarray | None = None
                   ) -> np.ndarray:
  """Geodesic angle in degrees (N,) of the head rotation (yaw, pitch, roll) (N, 3) from
  frontal, or from `reference_deg` (N, 3) when given (Fig. 10: the driver's rotation, and
  its angle to the guiding bank frame)."""
  from fiancee_jax.data import heads as heads_data  # noqa: PLC0415
  a = np.asarray(angles_deg, np.float64).reshape(-1, 3)
  b = np.zeros_like(a) if reference_deg is None else np.asarray(reference_deg,
                                                                 np.float64).reshape(-1, 3)
  out = []
  for x, y in zip(a, b):
    rel = heads_data.rotation(y).T @ heads_data.rotation(x)
    out.append(np.degrees(np.arccos(np.clip((np.trace(rel) - 1) / 2, -1.0, 1.0))))
  return np.asarray(out, np.float64)


def nearest_bank_keys(pipeline: fiancee.Pipeline, motion: np.ndarray,
                      identity: np.ndarray) -> np.ndarray:
  """The bank key (N, D) retrieval picks for each driver key `motion` (N, D) among its source
  identity's frames (the guiding frame's key)."""
  params = pipeline.params
  cls = np.asarray(params['bank_slots'])[np.asarray(identity, np.int64)]
  idx = bank_lib.nearest(params['bank'], jnp.asarray(motion, jnp.float32), jnp.asarray(cls),
                         backend='device')
  return np.asarray(params['bank'].keys)[np.asarray(idx)]

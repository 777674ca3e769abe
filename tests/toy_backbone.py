"""A third backbone, used only by the tests, to prove the core is generic: an unconditional
noise-to-image decoder (what the paper's Discussion says StyleGAN would be), without a bank.

z (B, z_dim) -> Dense -> 4x4 map -> `num_blocks` blocks (nearest x2 + conv3x3 + lrelu) ->
conv3x3 + tanh at 4 * 2**num_blocks pixels. Its adapter implements `Backbone` and nothing in
fiancee_jax/ knows it: tests register it with `fiancee_jax.registry.register`.

Every stage hook is implemented, small but real (tests/core/test_generic_core.py runs them
through the stages' public drivers):
  gan_task        `ToyGAN`: a strided-conv discriminator (widths config.disc.channels[1:]),
                  the non-saturating logistic GAN loss on the config's data images (labels
                  ignored), EMA generator; z per global example index, so a step does not
                  depend on the device count
  branch_losses   `ToyBranchLosses`: per exit, non-saturating adversarial loss of its own
                  discriminator copy + L1_WEIGHT x L1 to the frozen backbone's image; the
                  copies learn real data images vs that exit's image
  predictor_rows  `ToyPredictorRows`: train = predictor.num_train x num_noises fixed noises;
                  validation / calibration (routing.calibration_split of num_validation) and
                  test (num_test) = fresh noises, one draw per split
  infer_inputs    `ToyInputs`: --noise_seed -> z (`infer.inputs.noise`), predictor rows -> z
"""
from __future__ import annotations

import json
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from fiancee_jax import config as cfg
from fiancee_jax.core import pipeline as pl
from fiancee_jax.core import routing
from fiancee_jax.core.branches import BlockSpec, BranchSpec
from fiancee_jax.core.interface import Backbone, Prefix
from fiancee_jax.core.predictor_data import PredictorDataError, RowSet
from fiancee_jax.data.loader import Loader
from fiancee_jax.infer import inputs as infer_inputs
from fiancee_jax.infer.inputs import InferError, Request
from fiancee_jax.metrics import macs
from fiancee_jax.train import logging as tlog
from fiancee_jax.train import parallel
from fiancee_jax.train.state import StepState, adam, ema_update, per_copy

NAME = 'toy'


def base_config() -> ml_collections.ConfigDict:
  """The toy's config: the sections every stage reads (cfg.base_oasis's, less the model)."""
  c = cfg.base_oasis()
  c.backbone = NAME
  c.name = 'toy'
  c.model = ml_collections.ConfigDict({'z_dim': 8, 'ch': 16, 'num_blocks': 4})
  c.data.height = c.data.width = 4 * 2 ** 4
  c.branches.exits = (1, 2)
  c.branches.sf = 0.5
  c.branches.min_channels = 4
  c.branches.use_bank = False
  c.disc.channels = (3, 8, 16)      # the toy discriminator: strided convs of these widths
  c.predictor.mlp = (16,)
  return c


def _check(config, need) -> None:
  m, d = config.model, config.data
  need(d.height == d.width == 4 * 2 ** m.num_blocks,
       f'data: expected {4 * 2 ** m.num_blocks}x{4 * 2 ** m.num_blocks} for {m.num_blocks} blocks')
  need(all(1 <= k < m.num_blocks for k in config.branches.exits), 'branches.exits out of range')
  need(len(config.disc.channels) >= 2 and config.disc.channels[0] == 3,
       'disc.channels: expected 3 then the discriminator widths')
  need(config.predictor.loss in ('mse', 'mae'), "predictor.loss: expected 'mse' or 'mae'")


cfg.register_base(NAME, base_config, _check)


def _block(ch: int, name: str) -> nn.Module:
  return nn.Conv(ch, (3, 3), padding='SAME', name=name)


class Decoder(nn.Module):
  z_dim: int
  ch: int
  num_blocks: int

  def setup(self):
    self.stem = nn.Dense(4 * 4 * self.ch)
    self.body = [_block(self.ch, f'body_{i}') for i in range(self.num_blocks)]
    self.to_rgb = nn.Conv(3, (3, 3), padding='SAME')

  def start(self, z: jax.Array) -> jax.Array:
    return self.stem(z).reshape(z.shape[0], 4, 4, self.ch)

  def run_blocks(self, x: jax.Array, start: int, stop: int) -> tuple[jax.Array, dict]:
    taps = {}
    for k in range(start + 1, stop + 1):
      x = nn.leaky_relu(self.body[k - 1](jnp.repeat(jnp.repeat(x, 2, 1), 2, 2)), 0.2)
      taps[f'block{k}'] = x
    return x, taps

  def head(self, x: jax.Array) -> jax.Array:
    return jnp.tanh(self.to_rgb(x))

  def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
    return self.head(self.run_blocks(self.start(z), 0, self.num_blocks)[0])


class ToyBranch(nn.Module):
  spec: BranchSpec

  @nn.compact
  def __call__(self, x, ctx=None, guide=None, train=False):
    for i, b in enumerate(self.spec):
      x = nn.leaky_relu(_block(b.fout, f'body_{i}')(jnp.repeat(jnp.repeat(x, 2, 1), 2, 2)), 0.2)
    return jnp.tanh(nn.Conv(3, (3, 3), padding='SAME', name='to_rgb')(x))


class ToyPredictor(nn.Module):
  num_exits: int
  mlp: Sequence[int]

  @nn.compact
  def __call__(self, feat):
    x = feat.reshape(feat.shape[0], -1)
    for i, w in enumerate(self.mlp):
      x = nn.relu(nn.Dense(w, name=f'fc{i}')(x))
    return nn.Dense(self.num_exits, name='out')(x)


class ToyDiscriminator(nn.Module):
  """Strided conv3x3 + lrelu per width, then one real/fake logit per image."""
  widths: Sequence[int]

  @nn.compact
  def __call__(self, x):
    for i, w in enumerate(self.widths):
      x = nn.leaky_relu(nn.Conv(w, (3, 3), strides=(2, 2), padding='SAME', name=f'conv{i}')(x),
                        0.2)
    return nn.Dense(1, name='logit')(x.reshape(x.shape[0], -1))[:, 0]


# ------------------------------------------------------------------------------ helpers

L1_WEIGHT = 10.0                      # branch loss: adversarial + L1_WEIGHT x L1 to the backbone
NOISE_TAGS = {'train': 11, 'validation': 12, 'calibration': 13, 'test': 14, 'eval': 15}


def _images(batch: Mapping[str, Any]) -> jax.Array:
  """uint8 images (B, H, W, 3) -> float32 in [-1, 1]."""
  return batch['image'].astype(jnp.float32) / 127.5 - 1.0


def _image_only(ex: dict) -> dict:
  return {'image': ex['image']}


def _first_ids(b: int, axis_name: str | None) -> jax.Array:
  """Global example indices of this device's b examples."""
  first = lax.axis_index(axis_name) * b if axis_name is not None else 0
  return first + jnp.arange(b)


def _z_of(key: jax.Array, ids: jax.Array, z_dim: int) -> jax.Array:
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (z_dim,)))(ids)


def noises(config, tag: str, n: int) -> np.ndarray:
  """n noises (n, z_dim) of one fixed draw per tag (NOISE_TAGS)."""
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), NOISE_TAGS[tag])
  return np.asarray(jax.random.normal(key, (n, config.model.z_dim)), np.float32)


def _first_images(src, n: int) -> np.ndarray:
  return np.stack([np.asarray(src[i]['image'], np.float32) / 127.5 - 1.0 for i in range(n)])


# ------------------------------------------------------------------------------ stage hooks

class ToyGAN:
  """The backbone stage's `train.gan.GANTask`: non-saturating logistic GAN on data images."""
  sample_tag = 'real_ema'
  console_metrics = None

  def __init__(self, config, axis_name: str | None = parallel.AXIS):
    t, m = config.train, config.model
    self.config, self.axis_name = config, axis_name
    self.generator = Decoder(m.z_dim, m.ch, m.num_blocks)
    self.discriminator = ToyDiscriminator(tuple(config.disc.channels[1:]))
    self.tx_g = adam(t.lr_g, t.beta1, t.beta2, t.weight_decay)
    self.tx_d = adam(t.lr_d, t.beta1, t.beta2, t.weight_decay)
    self.z_dim, self.ema_decay = int(m.z_dim), float(t.ema_decay)

  def compile_key(self) -> str:
    c, t = self.config, self.config.train
    return json.dumps({'backbone': NAME, 'model': c.model.to_dict(), 'disc': c.disc.to_dict(),
                       'shape': (c.data.height, c.data.width), 'parallel': c.parallel,
                       'train': {k: t[k] for k in ('lr_g', 'lr_d', 'beta1', 'beta2',
                                                   'weight_decay', 'ema_decay')}},
                      sort_keys=True, default=str)

  def init_variables(self, k_g, k_d):
    d = self.config.data
    return (self.generator.init({'params': k_g}, jnp.zeros((1, self.z_dim)), False),
            self.discriminator.init({'params': k_d}, jnp.zeros((1, d.height, d.width, 3))))

  def init_params(self, params_g, state_g, params_d, state_d):
    return params_g, params_d

  def frozen(self) -> dict:
    return {}

  def train_step(self, carry: StepState, batch, *, axis_name: str | None = parallel.AXIS):
    st = carry.train
    G, D = self.generator, self.discriminator
    real = _images(batch)
    ids = _first_ids(real.shape[0], axis_name)
    k_d, k_g = jax.random.split(jax.random.fold_in(st.rng, st.step))
    z_d, z_g = _z_of(k_d, ids, self.z_dim), _z_of(k_g, ids, self.z_dim)
    pmean = (lambda x: lax.pmean(x, axis_name)) if axis_name is not None else (lambda x: x)

    def gen(params, z):
      return G.apply({'params': params, **st.state_g}, z, True)

    def disc(params, x):
      return D.apply({'params': params, **st.state_d}, x)

    fake = lax.stop_gradient(gen(st.params_g, z_d))

    def d_loss_fn(params_d):
      l_real = jnp.mean(jax.nn.softplus(-disc(params_d, real)))
      l_fake = jnp.mean(jax.nn.softplus(disc(params_d, fake)))
      return l_real + l_fake, {'d_real': l_real, 'd_fake': l_fake}

    (d_total, d_m), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(st.params_d)
    d_up, opt_d = self.tx_d.update(pmean(d_grads), st.opt_d, st.params_d)
    params_d = optax.apply_updates(st.params_d, d_up)

    def g_loss_fn(params_g):
      return jnp.mean(jax.nn.softplus(-disc(params_d, gen(params_g, z_g))))

    g_adv, g_grads = jax.value_and_grad(g_loss_fn)(st.params_g)
    g_up, opt_g = self.tx_g.update(pmean(g_grads), st.opt_g, st.params_g)
    params_g = optax.apply_updates(st.params_g, g_up)
    new = st.replace(step=st.step + 1, params_g=params_g, params_d=params_d, opt_g=opt_g,
                     opt_d=opt_d,
                     ema_params_g=ema_update(st.ema_params_g, params_g, self.ema_decay))
    return carry.replace(train=new), pmean({**d_m, 'd_total': d_total, 'g_adv': g_adv})

  def loader(self, src, batch_size, *, seed, shuffle=True, state=None, process_index=0,
             process_count=1) -> Loader:
    return Loader(src, batch_size, seed=seed, shuffle=shuffle, process_index=process_index,
                  process_count=process_count, state=state, transform=_image_only)

  def refresh_batches(self, batches: Iterator[dict], num: int) -> Iterator[dict]:
    """The decoder has no batch statistics: noise batches of the loader's size (a no-op
    refresh, what the driver's contract asks)."""
    key = jax.random.PRNGKey(self.config.seed + 3)
    for i in range(num):
      b = len(next(batches)['image'])
      yield {'z': jax.random.normal(jax.random.fold_in(key, i), (b, self.z_dim))}

  def refresh_apply(self, variables, batch):
    mutable = [k for k in variables if k != 'params']
    return self.generator.apply(variables, batch['z'], True, mutable=mutable)

  def sample_inputs(self, src) -> dict[str, np.ndarray]:
    """The first min(4, train.batch_size) train images (a reference column) and fixed noises."""
    n = min(4, int(self.config.train.batch_size), len(src))
    return {'real': _first_images(src, n), 'z': noises(self.config, 'eval', n)}

  def sample(self, params, collections, inputs):
    return self.generator.apply({'params': params, **collections}, inputs['z'], False)

  def sample_grid(self, inputs, images) -> np.ndarray:
    """real | EMA generator (unpaired: the toy is unconditional)."""
    return tlog.image_grid(inputs['real'], images)


class ToyBranchLosses:
  """The branch stage's `train.branches.BranchLosses`."""
  sample_tag = 'backbone_exits'
  console_terms = ('l1',)

  def __init__(self, config):
    self.config = config
    self.disc = ToyDiscriminator(tuple(config.disc.channels[1:]))

  def optimizers(self):
    b, t = self.config.branches, self.config.train
    return adam(b.lr, t.beta1, t.beta2, 0.0), adam(b.lr, t.beta1, t.beta2, 0.0), float(b.lr)

  def init_params(self, params_b, state_b):
    return params_b

  def frozen(self):
    return {}

  def bank_select(self, workdir: str) -> dict:
    return {}

  def train_loader(self, src, batch_size, *, seed, state, process_index, process_count):
    return Loader(src, batch_size, seed=seed, shuffle=True, process_index=process_index,
                  process_count=process_count, state=state, transform=_image_only)

  def step_inputs(self, batch, rng, step, axis_name):
    """(z,) drawn per global example index; the data images are the discriminators' reals."""
    real = _images(batch)
    z = _z_of(jax.random.fold_in(rng, step), _first_ids(real.shape[0], axis_name),
              self.config.model.z_dim)
    return (z,), {'real': real}

  def _logits(self, params, coll, x):
    return self.disc.apply({'params': params, **coll}, x), coll

  def branch_loss(self, fakes, target, aux, params_d, state_d, frozen, axis_name):
    logits, sd = per_copy(self._logits, params_d, state_d, fakes)
    adv = jnp.mean(jax.nn.softplus(-logits), axis=1)
    l1 = jnp.mean(jnp.abs(fakes - target[None]), axis=(1, 2, 3, 4))
    return adv + L1_WEIGHT * l1, (sd, {'adv': adv, 'l1': l1})

  def disc_loss(self, params_d, state_d, fakes, target, aux, axis_name):
    def one(params, coll, fake):
      l_real = jnp.mean(jax.nn.softplus(-self._logits(params, coll, aux['real'])[0]))
      l_fake = jnp.mean(jax.nn.softplus(self._logits(params, coll, fake)[0]))
      return l_real + l_fake, (coll, {'d_real': l_real, 'd_fake': l_fake})
    return per_copy(one, params_d, state_d, fakes)

  def sample_inputs(self, src):
    n = min(4, int(self.config.branches.batch_size))
    return (noises(self.config, 'eval', n),), ()

  def eval_rows(self, src, n):
    """n evaluation noises; real = the split's first n images (FID)."""
    return (noises(self.config, 'eval', n),), _first_images(src, n), ()

  def sample_grid(self, shown, images, exits) -> np.ndarray:
    """backbone | exit 1..E."""
    return tlog.image_grid(np.asarray(images['backbone']), *(np.asarray(images[k]) for k in exits))


class ToyPredictorRows:
  """`core.predictor_data.PredictorRows`: a row is a noise; index 'z' (N, z_dim)."""

  def __init__(self, config):
    self.config = config

  def rows(self, workdir: str, split: str) -> RowSet:
    c, p = self.config, self.config.predictor
    if split == 'train':
      z = noises(c, 'train', int(p.num_train) * int(p.num_noises))
    elif split in ('validation', 'calibration'):
      cal, val = routing.calibration_split(p.num_validation, c.routing.calibration_fraction,
                                           seed=c.seed)
      z = noises(c, split, len(val if split == 'validation' else cal))
    elif split == 'test':
      z = noises(c, 'test', int(p.num_test))
    else:
      raise PredictorDataError(f'predictor split {split!r}: expected train, validation, '
                               'calibration or test')
    data_split = {'train': 'train', 'test': 'test'}.get(split, 'validation')
    return RowSet(data_split, {'z': z})   # no data is read: the split only names the rows

  def inputs(self, workdir: str, rows: RowSet) -> tuple[np.ndarray, ...]:
    return (rows.index['z'],)

  def to_route(self, z):
    return (z,)

  def pred_in_shape(self) -> tuple[int, ...]:
    return (8, 8, int(self.config.model.ch))   # block 1's output (4x4 map upsampled once)


class ToyInputs(infer_inputs.BackboneInputs):
  """`infer.inputs.BackboneInputs`: --noise_seed only (the toy takes no image or label)."""
  report_kind = 'oasis'             # report.py's generic layout (figures Fig. 3/4/8/9)

  def from_flags(self, workdir: str, flags: dict[str, Any]) -> Request:
    other = infer_inputs.given(flags, ('label', 'index', 'source', 'driver', 'source_index',
                                       'driver_index', 'identity'))
    if other:
      raise InferError(f'{self.config.name} is unconditional: give --noise_seed only, not '
                       + ', '.join(f'--{n}' for n in other))
    seed = int(flags.get('noise_seed') or 0)
    return Request(inputs=(infer_inputs.noise(self.config, seed)[None],), name=f's{seed}',
                   info={'noise_seed': seed})

  def from_rows(self, workdir: str, rows: dict[str, Any]):
    return (np.asarray(rows['z'], np.float32),), {}

  def sample_columns(self, inputs, k, guide) -> dict[str, Any]:
    return {'inputs': []}            # no input column: the routes and the routed image only


class Toy(Backbone):
  name = NAME
  scale_factors = (0.5,)
  has_bank = False

  def blocks(self) -> list[BlockSpec]:
    m = self.config.model
    return [BlockSpec(m.ch, m.ch, 4 * 2 ** k, 4 * 2 ** k, 'nearest')
            for k in range(1, m.num_blocks + 1)]

  def generator(self, axis_name=None) -> Decoder:
    m = self.config.model
    return Decoder(m.z_dim, m.ch, m.num_blocks)

  def discriminator(self) -> ToyDiscriminator:
    return ToyDiscriminator(tuple(self.config.disc.channels[1:]))

  def branch_block(self, spec, use_bank, axis_name=None) -> ToyBranch:
    return ToyBranch(spec)

  def predictor(self) -> ToyPredictor:
    return ToyPredictor(len(self.exits), tuple(self.config.predictor.mlp))

  # ---------------------------------------------------------------- stage hooks

  def gan_task(self, axis_name: str | None = parallel.AXIS) -> ToyGAN:
    return ToyGAN(self.config, axis_name)

  def branch_losses(self) -> ToyBranchLosses:
    return ToyBranchLosses(self.config)

  def predictor_rows(self) -> ToyPredictorRows:
    return ToyPredictorRows(self.config)

  def infer_inputs(self) -> ToyInputs:
    return ToyInputs(self.config)

  def abstract_inputs(self, batch: int = 1):
    return (jax.ShapeDtypeStruct((batch, self.config.model.z_dim), jnp.float32),)

  def prefix_stop(self, exits, use_bank) -> int:
    return min(exits)

  def prefix(self, gen_vars, inputs, stop) -> Prefix:
    (z,) = inputs

    def f(mdl, zz):
      return mdl.run_blocks(mdl.start(zz), 0, stop)
    x, taps = self.generator().apply(gen_vars, z, method=f)
    return Prefix(x=x, ctx=None, taps=taps, pred_in=taps['block1'], query=None, at=stop)

  def advance(self, gen_vars, x, ctx, start, stop):
    return self.generator().apply(gen_vars, x, start, stop, method='run_blocks')

  def head(self, gen_vars, x):
    return self.generator().apply(gen_vars, x, method='head')

  def backbone_route(self) -> macs.Route:
    g = self.generator()
    (z,) = self.abstract_inputs()
    v = jax.eval_shape(lambda a: g.init(jax.random.key(0), a), z)
    return macs.Route('backbone', lambda vv, a: g.apply(vv, a), (v, z),
                      macs.count_params(v), (self.config.data.height, self.config.data.width))

  def exit_routes(self, sf: float, use_bank: bool) -> list[macs.Route]:
    c = ml_collections.ConfigDict(self.config.to_dict())
    c.branches.sf = sf
    p, params = pl.abstract(Toy(c), False)
    return [macs.Route(f'exit{k}', fn, (params, *self.abstract_inputs()), 0,
                       (c.data.height, c.data.width), {'sf': sf, 'bank': False, 'exit': k})
            for k, fn in zip(p.exits, pl.route_fns(p)[:-1])]

  def route_costs(self, use_bank: bool) -> np.ndarray:
    rows = [macs.count_macs(r.fn, *r.args) / 1e9
            for r in self.exit_routes(self.config.branches.sf, False) + [self.backbone_route()]]
    return np.asarray(rows, np.float64)

"""Config schema, defaults and validation for every experiment.

Each `configs/*.py` starts from `base_oasis()` or `base_megaportraits()` (locked
ConfigDicts: assigning an unknown key raises) and sets values. `validate(config)`
checks that the key set equals the schema's and that the values are possible, and
raises one `ConfigError` naming every problem.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Sequence

import ml_collections
from fiancee_jax.errors import FianceeError

# Cityscapes: 34 label ids (0..33) + 'unknown' -> 35 semantic channels (OASIS semantic_nc).
CITYSCAPES_NUM_CLASSES = 35


class ConfigError(FianceeError):
  """A config with unknown keys or impossible values."""


def _common(backbone: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = f'{backbone}_custom'
  c.backbone = backbone          # 'oasis' | 'megaportraits'
  c.seed = 0
  c.parallel = 'shard_map'       # 'shard_map' | 'pmap' (same per-device step under both)
  c.dtype = 'float32'            # compute dtype: 'float32' | 'bfloat16' (mixed precision)

  c.data = ml_collections.ConfigDict()
  c.data.name = ''               # TFDS builder name, see fiancee_jax/data
  c.data.data_dir = ''           # where prepared array_record files live ('' = <workdir>/../data)
  c.data.manual_dir = ''         # user's download (cityscapes, video_frames)
  c.data.height = 64
  c.data.width = 128
  c.data.num_train = 2000        # synthetic builders only
  c.data.num_validation = 200
  c.data.num_test = 200
  c.data.seed = 0                # synthetic builders: content seed
  c.data.num_workers = 0         # loader threads (0 = in-process)

  c.train = ml_collections.ConfigDict()   # backbone training
  c.train.batch_size = 8                  # global batch (split over devices)
  c.train.num_steps = 1000
  c.train.lr_g = 4e-4
  c.train.lr_d = 4e-4
  c.train.beta1 = 0.0
  c.train.beta2 = 0.999
  c.train.weight_decay = 0.0
  c.train.ema_decay = 0.999
  c.train.log_every = 10
  c.train.sample_every = 200
  c.train.ckpt_every = 200
  c.train.keep_ckpts = 3
  c.train.bn_refresh_batches = 50  # OASIS refreshes EMA BN stats with 50 train-mode batches
  # nn.remat the generator's blocks (OASIS SPADE-ResBlocks, G2D ResBlock2Ds): activations
  # recomputed in the backward pass, less memory per device (bench/train_memory.py, README
  # 'GPU / TPU'); the same params and checkpoints either way (not part of config_hash).
  c.train.remat = False

  c.branches = ml_collections.ConfigDict()
  c.branches.sf = 0.25           # scale factor on branch widths (Table S8 / S9)
  c.branches.min_channels = 64   # no branch layer narrower than this
  c.branches.use_bank = True     # ablation switch: False trains unguided branches
  c.branches.batch_size = 8
  c.branches.num_steps = 500
  c.branches.lr = 4e-4
  c.branches.log_every = 10
  c.branches.sample_every = 200
  c.branches.ckpt_every = 200
  # How a branch starts: 'random' (the paper) | 'backbone' (every weight the branch shares
  # with the backbone blocks it mirrors copied from the trained backbone, channels sliced:
  # `BranchLosses.from_backbone`).
  c.branches.init = 'random'
  # Steps of distillation before the adversarial phase (Eq. S1 / S3): the branch loss without
  # discriminators (distill_l1 * L1 + the perceptual terms vs the backbone image), no
  # discriminator update. 0 = the paper (adversarial from the first step); -1 = every step.
  c.branches.warmup_steps = 0
  c.branches.distill_l1 = 10.0
  # OASIS warm-up: VGG19's weight (the adversarial phase keeps alpha_vgg); 0 = LPIPS's VGG16
  # the one perceptual trunk (VGG19 fwd/bwd for 4 exits was ~4/5 of a warm-up step:
  # bench/branch_step.py).
  c.branches.distill_vgg = 0.0

  c.bank = ml_collections.ConfigDict()
  # 'auto' (the faster per platform, measured: FAISS on CPU, device on GPU/TPU; core/bank/index.py)
  # | 'device' (matmul + masked argmin) | 'faiss' (pure_callback; GPU index with faiss-gpu)
  c.bank.backend = 'auto'
  c.bank.index = 'flat'          # 'flat' (exact) | 'ivf' (both backends) | 'hnsw' (FAISS only)
  c.bank.ivf_nlist = 64          # IVF lists (k-means centroids) per class
  c.bank.ivf_nprobe = 8          # IVF lists scanned per query (>= nlist: exact)
  c.bank.hnsw_m = 32             # HNSW graph degree
  c.bank.hnsw_ef_search = 64     # HNSW search beam
  c.bank.faiss_threads = 0       # FAISS OpenMP threads per search (0: all cores; README)
  c.bank.max_per_class = 5000    # FPS cap per class (paper 5000)
  # Inputs per backbone call while building a bank: a fixed compiled shape, so the bank's bits
  # depend on this and on the CPU/GPU kernels, never on build_bank.py's --batch_size.
  c.bank.compute_batch = 8

  c.predictor = ml_collections.ConfigDict()
  c.predictor.num_noises = 100   # K fixed noises / driver frames per input (paper 100)
  c.predictor.num_train = 500    # inputs (label maps / pairs) for the training set
  c.predictor.num_validation = 100
  c.predictor.num_test = 100
  c.predictor.batch_size = 64
  c.predictor.num_steps = 2000
  c.predictor.lr = 0.01
  # Standardise the targets: the net learns (LPIPS - mean) / std per exit of the training rows
  # (stored with the params; core/predictor_model.py). The paper trains on raw LPIPS.
  c.predictor.target_norm = False

  c.routing = ml_collections.ConfigDict()
  c.routing.alpha = 0.1          # conformal: allowed share of outputs above the threshold
  c.routing.calibration_fraction = 0.5  # of the validation set, held out for calibration
  c.routing.thresholds = (0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3)
  c.routing.bucket_sizes = (1, 4, 16, 64)
  return c


def base_oasis() -> ml_collections.ConfigDict:
  """OASIS + FIANCEE defaults at the paper's Cityscapes settings (Sec. 4.1, S1.1)."""
  c = _common('oasis')
  c.data.name = 'synthetic_streets'
  c.data.num_classes = CITYSCAPES_NUM_CLASSES
  c.data.height = 256
  c.data.width = 512

  c.model = ml_collections.ConfigDict()
  c.model.ch = 64                # OASIS channels_G: widths 16,16,16,8,4,2,1 x ch
  c.model.z_dim = 64             # 3D noise channels
  c.model.spade_hidden = 128     # SPADE shared-conv width
  c.model.num_blocks = 6         # SPADE-ResBlocks (fixed by the architecture)

  c.disc = ml_collections.ConfigDict()
  c.disc.channels = (3, 128, 128, 256, 256, 512, 512)  # OASIS U-Net discriminator

  c.train.batch_size = 20
  c.train.labelmix_lambda = 5.0   # Cityscapes
  c.train.vgg_lambda = 0.0        # OASIS default: off
  c.train.ema_decay = 0.999       # Cityscapes
  # Spectral-norm kernels at init: 'xavier' = OASIS's xavier_normal(0.02); 'torch_default' =
  # the same forward pass with kernels at PyTorch's default conv size (layers.py says why).
  c.train.sn_kernel_init = 'xavier'

  c.branches.exits = (1, 2, 3, 4)  # after ResBlock k (1-based), depth 6-k
  c.branches.alpha_vgg = 10.0      # Eq. S1
  c.branches.beta_lpips = 5.0

  c.bank.num_maps = 500           # label maps x noises -> keys (Sec. 4.1)
  c.bank.num_noises = 100
  c.bank.key_block = 1            # keys: features after first conv + ResBlock 1
  c.bank.value_block = 3          # values: features after ResBlock 3

  c.predictor.conv_channels = 512          # Table S7 (OASIS): conv 1024->512 + ResBlock
  c.predictor.mlp = (4096, 1024, 512, 128)
  c.predictor.loss = 'mse'
  c.predictor.optimizer = 'sgd_cosine'
  # Noises of the train / validation rows: 'fixed' (the paper: the same K noises for every
  # map, the bank's) | 'fresh' (K new noises per map, never the bank's). Calibration and test
  # rows always take fresh ones, so with few fixed noises the predictor meets on test a noise
  # it never saw and bank hits it was trained on (README, 'Predictor rows').
  c.predictor.noises = 'fixed'
  c.lock()
  return c


def base_megaportraits() -> ml_collections.ConfigDict:
  """MegaPortraits-style G2D + FIANCEE defaults at the paper's settings (Sec. 4.2, S1.2)."""
  c = _common('megaportraits')
  c.data.name = 'synthetic_heads'
  c.data.height = 512
  c.data.width = 512
  c.data.num_identities = 50      # synthetic_heads only
  c.data.frames_per_identity = 40
  c.data.frames_per_video = 8     # video_frames only: evenly spaced frames read per video

  c.model = ml_collections.ConfigDict()
  c.model.g2d_in = 1536           # G2D input channels at base resolution (64x64 at 512 px)
  c.model.ch = 512                # G2D width
  c.model.num_res = 6             # ResBlock2D at base resolution
  c.model.up_channels = (256, 128, 64)  # 3 x [bilinear x2 + ResBlock2D]
  c.model.enc_ch = 64             # appearance encoder base width (front end, ours)
  c.model.expr_dim = 512          # motion encoder expression vector
  c.model.motion_ch = 32          # motion encoder base width

  c.disc = ml_collections.ConfigDict()
  c.disc.ch = 64                  # multi-scale patch discriminator
  c.disc.num_scales = 2
  c.disc.num_layers = 3

  c.train.lr_g = 2e-4
  c.train.lr_d = 2e-4
  c.train.beta1 = 0.05
  c.train.weight_decay = 1e-2
  c.train.min_lr = 1e-6
  c.train.batch_size = 6
  c.train.loss_weights = ml_collections.ConfigDict(
      dict(vgg=18.0, ms_ssim=0.84, l1=0.16, fm=40.0, gaze=0.0))  # S1.2.2 (gaze: no model)

  c.branches.exits = (2, 4, 6)    # after ResBlock2D k, depths 7, 5, 3 (Table S9)
  c.branches.sf = 1.0 / 8.0
  c.branches.min_channels = 24
  c.branches.lr = 2e-4

  c.bank.frames_per_identity = 960  # paper: 960 source frames

  c.predictor.mlp = (512, 256, 128, 64)  # Table S7 (MegaPortraits)
  c.predictor.loss = 'mae'
  c.predictor.optimizer = 'adamw_cosine'
  c.predictor.lr = 2e-4
  c.lock()
  return c


_BASES = {'oasis': base_oasis, 'megaportraits': base_megaportraits}


def _flat_keys(c: ml_collections.ConfigDict, prefix: str = '') -> set[str]:
  keys = set()
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      keys |= _flat_keys(v, prefix + k + '.')
    else:
      keys.add(prefix + k)
  return keys


def oasis_widths(ch: int) -> tuple[int, ...]:
  """OASIS generator widths: input of block 0, then the output of each of 6 blocks."""
  return tuple(m * ch for m in (16, 16, 16, 8, 4, 2, 1))


def scaled_width(c: int, sf: float, min_channels: int, unit: int | None = None) -> int:
  """Branch width for a backbone width `c` (Table S8 / S9): scaled by `sf`, never below
  `min_channels`. With `unit` (OASIS: c = multiple x channels_G) the unit is scaled and
  rounded first, as OASIS widths are built: SF 1/3 of 1024 = 16 x int(64/3) = 336."""
  scaled = (c // unit) * int(unit * sf) if unit else int(c * sf)
  return max(scaled, min_channels)


# predictor.optimizer values (train/predictor.py: make_optimizer builds each).
PREDICTOR_OPTIMIZERS = ('sgd_cosine', 'adamw_cosine', 'adam_cosine')


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raise ConfigError listing every unknown/missing key and impossible value."""
  problems: list[str] = []
  backbone = config.get('backbone')
  if backbone not in _BASES:
    raise ConfigError(f"config.backbone={backbone!r}: expected one of {sorted(_BASES)}")
  schema = _flat_keys(_BASES[backbone]())
  have = _flat_keys(config)
  for k in sorted(have - schema):
    problems.append(f'unknown key config.{k}')
  for k in sorted(schema - have):
    problems.append(f'missing key config.{k}')
  if problems:
    raise ConfigError('Invalid config:\n  ' + '\n  '.join(problems))

  def need(cond: bool, msg: str):
    if not cond:
      problems.append(msg)

  d, b = config.data, config.branches
  need(config.parallel in ('shard_map', 'pmap'),
       f"parallel={config.parallel!r}: expected 'shard_map' or 'pmap'")
  need(config.dtype in ('float32', 'bfloat16'), f"dtype={config.dtype!r}: expected float32|bfloat16")
  need(d.height > 0 and d.width > 0, f'data resolution {d.height}x{d.width} must be positive')
  need(b.sf > 0 and b.sf <= 1, f'branches.sf={b.sf}: expected 0 < sf <= 1')
  need(b.min_channels > 0, f'branches.min_channels={b.min_channels}: expected > 0')
  need(b.init in ('random', 'backbone'),
       f"branches.init={b.init!r}: expected 'random' or 'backbone'")
  need(b.warmup_steps >= -1, f'branches.warmup_steps={b.warmup_steps}: expected >= 0, or -1 '
       '(every step)')
  need(b.distill_l1 >= 0, f'branches.distill_l1={b.distill_l1}: expected >= 0')
  need(b.distill_vgg >= 0, f'branches.distill_vgg={b.distill_vgg}: expected >= 0')
  need(config.bank.backend in ('auto', 'device', 'faiss'),
       f"bank.backend={config.bank.backend!r}: expected 'auto', 'device' or 'faiss'")
  need(config.bank.index in ('flat', 'ivf', 'hnsw'),
       f"bank.index={config.bank.index!r}: expected 'flat', 'ivf' or 'hnsw'")
  need(not (config.bank.index == 'hnsw' and config.bank.backend == 'device'),
       "bank.index='hnsw' is FAISS only: bank.backend 'faiss' or 'auto'")
  for k in ('ivf_nlist', 'ivf_nprobe', 'hnsw_m', 'hnsw_ef_search'):
    need(int(config.bank[k]) >= 1, f'bank.{k}={config.bank[k]}: expected >= 1')
  need(int(config.bank.faiss_threads) >= 0, 'bank.faiss_threads: expected >= 0 (0: all cores)')
  need(config.bank.max_per_class > 0, 'bank.max_per_class must be > 0')
  need(config.bank.compute_batch > 0,
       f'bank.compute_batch={config.bank.compute_batch}: expected > 0')
  need(config.predictor.optimizer in PREDICTOR_OPTIMIZERS,
       f'predictor.optimizer={config.predictor.optimizer!r}: expected one of '
       f'{PREDICTOR_OPTIMIZERS}')
  need(0 < config.routing.alpha < 1, f'routing.alpha={config.routing.alpha}: expected in (0, 1)')
  need(0 < config.routing.calibration_fraction < 1,
       'routing.calibration_fraction: expected in (0, 1)')
  need(all(t > 0 for t in config.routing.thresholds), 'routing.thresholds must all be > 0')
  need(len(config.routing.bucket_sizes) > 0 and
       list(config.routing.bucket_sizes) == sorted(set(config.routing.bucket_sizes)),
       'routing.bucket_sizes: expected a strictly increasing tuple')
  for sec in ('train', 'branches', 'predictor'):
    need(config[sec].batch_size > 0, f'{sec}.batch_size must be > 0')
    need(config[sec].num_steps >= 0, f'{sec}.num_steps must be >= 0')
  need(0 <= config.train.ema_decay < 1, 'train.ema_decay: expected in [0, 1)')
  need(isinstance(config.train.remat, bool),
       f'train.remat={config.train.remat!r}: expected True or False')

  _CHECKS.get(backbone, lambda c, need: None)(config, need)
  if problems:
    raise ConfigError('Invalid config:\n  ' + '\n  '.join(problems))
  return config


def _check_oasis(config: ml_collections.ConfigDict, need) -> None:
  d, b = config.data, config.branches
  m = config.model
  # 5 nearest x2 upsamplings (after every block but the last) from an initial map.
  need(d.height % 32 == 0 and d.width % 32 == 0,
       f'data resolution {d.height}x{d.width}: OASIS upsamples x32, '
       'height and width must be multiples of 32')
  need(d.num_classes >= 2, f'data.num_classes={d.num_classes}: expected >= 2')
  need(m.num_blocks == 6, f'model.num_blocks={m.num_blocks}: the OASIS generator has 6')
  need(config.train.sn_kernel_init in ('xavier', 'torch_default'),
       f"train.sn_kernel_init={config.train.sn_kernel_init!r}: expected 'xavier' or "
       "'torch_default'")
  need(m.ch > 0 and m.z_dim >= 0 and m.spade_hidden > 0, 'model.ch/z_dim/spade_hidden invalid')
  need(len(config.disc.channels) == 7 and config.disc.channels[0] == 3,
       'disc.channels: expected 7 widths starting with 3')
  need(len(b.exits) > 0 and all(1 <= k <= m.num_blocks - 2 for k in b.exits)
       and list(b.exits) == sorted(set(b.exits)),
       f'branches.exits={tuple(b.exits)}: expected increasing block indices in 1..4')
  need(b.min_channels <= max(oasis_widths(m.ch)),
       f'branches.min_channels={b.min_channels} exceeds the widest layer '
       f'{max(oasis_widths(m.ch))}')
  need(1 <= config.bank.key_block < config.bank.value_block <= m.num_blocks,
       'bank.key_block < bank.value_block <= 6 expected')
  need(config.predictor.loss in ('mse', 'mae'), "predictor.loss: expected 'mse' or 'mae'")
  need(config.predictor.noises in ('fixed', 'fresh'),
       f"predictor.noises={config.predictor.noises!r}: expected 'fixed' or 'fresh'")


def _check_megaportraits(config: ml_collections.ConfigDict, need) -> None:
  d, b = config.data, config.branches
  m = config.model
  need(d.height == d.width, f'data resolution {d.height}x{d.width}: G2D expects square images')
  need(d.height % 8 == 0, f'data.height={d.height}: G2D upsamples x8, expected a multiple of 8')
  need(len(m.up_channels) == 3, 'model.up_channels: expected 3 widths')
  need(len(b.exits) > 0 and all(1 <= k <= m.num_res for k in b.exits)
       and list(b.exits) == sorted(set(b.exits)),
       f'branches.exits={tuple(b.exits)}: expected increasing block indices in 1..{m.num_res}')
  need(b.min_channels <= m.ch, f'branches.min_channels={b.min_channels} exceeds model.ch={m.ch}')
  need(d.frames_per_video >= 1, f'data.frames_per_video={d.frames_per_video}: expected >= 1')


# Per-backbone config: the schema (every key a config must have) and the value checks.
_CHECKS = {'oasis': _check_oasis, 'megaportraits': _check_megaportraits}
# Data fields that fix the model's shapes (part of config_hash).
_SHAPE_KEYS = {'oasis': ('height', 'width', 'num_classes')}


def register_base(backbone: str, base: Callable[[], ml_collections.ConfigDict],
                  check: Callable[..., None] | None = None,
                  shape_keys: Sequence[str] = ('height', 'width')) -> None:
  """Add a backbone's config schema (and value checks) for `validate` (a new adapter, or a
  test's)."""
  _BASES[backbone] = base
  if check is not None:
    _CHECKS[backbone] = check
  _SHAPE_KEYS[backbone] = tuple(shape_keys)


# How long a stage runs and how often it reports: never part of a checkpoint's identity, so a
# finished run can be extended (`--config.branches.num_steps=...`) and resumes.
RUN_LENGTH_KEYS = ('num_steps', 'warmup_steps', 'log_every', 'sample_every', 'ckpt_every',
                   'keep_ckpts')


# Where a stage runs and how fast (paths, workers, search backend and threads): never what it
# computes, so never part of a hash (e.g. the predictor rows' cache fingerprint).
RUNTIME_KEYS = ('data_dir', 'manual_dir', 'num_workers', 'backend', 'faiss_threads')


def config_hash(config: ml_collections.ConfigDict, sections: Sequence[str] = ('model',)) -> str:
  """Stable short hash of the config sections that fix parameter shapes (less the
  RUN_LENGTH_KEYS and RUNTIME_KEYS)."""
  skip = set(RUN_LENGTH_KEYS) | set(RUNTIME_KEYS)
  payload = {s: {k: v for k, v in config[s].to_dict().items() if k not in skip}
             for s in sections}
  payload['backbone'] = config.backbone
  keys = _SHAPE_KEYS.get(config.backbone, ('height', 'width'))
  payload['shape'] = tuple(config.data[k] for k in keys)
  blob = json.dumps(payload, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Load `configs/<name>.py[:arg]` outside absl flags (tests, notebooks) and validate it."""
  import importlib.util
  if ':' in path and arg is None:
    path, arg = path.split(':', 1)
  spec = importlib.util.spec_from_file_location('_fiancee_config', path)
  if spec is None or spec.loader is None:
    raise ConfigError(f'cannot load config file {path!r}')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(arg) if arg is not None else module.get_config()
  return validate(cfg)


def to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())

"""MegaPortraits-style head avatars on `synthetic_heads` at 64x64 (CPU-sized).

G2D widths are the paper's / 8 (512 -> 64; up 32, 16, 8), base resolution 8x8; same
branch placement (after ResBlock2D 2, 4, 6) and SF 1/8 with min 4 channels.

  python train.py --config configs/megaportraits_synthetic.py --workdir runs/heads --stage=backbone
  python build_bank.py --config configs/megaportraits_synthetic.py --workdir runs/heads
  python train.py --config configs/megaportraits_synthetic.py --workdir runs/heads --stage=branches
  python train.py --config configs/megaportraits_synthetic.py --workdir runs/heads --stage=predictor
  python infer.py --config configs/megaportraits_synthetic.py --workdir runs/heads --sweep

`:tiny` shrinks resolution, widths and steps for the test suite.
"""
from fiancee_jax import config as cfg


def get_config(arg=None):
  c = cfg.base_megaportraits()
  c.name = 'megaportraits_synthetic'
  c.data.name = 'synthetic_heads'
  c.data.height = c.data.width = 64
  c.data.num_identities, c.data.frames_per_identity = 40, 40
  c.model.g2d_in, c.model.ch, c.model.up_channels = 192, 64, (32, 16, 8)
  c.model.enc_ch, c.model.motion_ch, c.model.expr_dim = 32, 16, 64
  c.train.batch_size = 8
  c.train.num_steps = 2000
  c.train.ema_decay = 0.99         # a CPU run of a few hundred steps: 0.999 would keep the init
  c.train.sample_every = 100
  c.branches.sf = 1.0 / 8.0
  c.branches.min_channels = 4
  c.branches.num_steps = 600
  c.bank.frames_per_identity = 40
  c.predictor.num_noises = 10
  c.predictor.num_train, c.predictor.num_validation, c.predictor.num_test = 400, 100, 100
  if arg == 'tiny':
    c.data.height = c.data.width = 32
    c.data.num_identities, c.data.frames_per_identity = 3, 4
    c.data.num_train, c.data.num_validation, c.data.num_test = 12, 6, 6
    c.model.g2d_in, c.model.ch, c.model.up_channels = 16, 16, (8, 8, 8)
    c.model.enc_ch, c.model.motion_ch, c.model.expr_dim = 8, 8, 16
    c.disc.ch = 8
    c.train.batch_size = 2
    c.train.num_steps = 2
    c.train.log_every = 1
    c.train.sample_every = 2
    c.train.ckpt_every = 2
    c.train.bn_refresh_batches = 2
    c.branches.num_steps = 2
    c.bank.frames_per_identity = 4
    c.predictor.num_train, c.predictor.num_validation, c.predictor.num_test = 8, 4, 4
    c.predictor.mlp = (16, 8)
    c.predictor.num_steps = 2
  elif arg is not None:
    raise ValueError(f"megaportraits_synthetic: unknown arg {arg!r}; expected 'tiny' or none")
  return c

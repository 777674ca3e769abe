"""MegaPortraits-style head avatars on VoxCeleb2 at the paper's settings (Sec. 4.2, S1.2; Tables 2, S9).

512x512 output, G2D from a 64x64x1536 input (31.6M params, 213.1 GMACs), branches after
ResBlock2D 2, 4, 6 with SF 1/8 and min 24 channels, 960-frame bank. Needs the user's
VoxCeleb2-style folder (`identity/video/*.mp4` or frames) and a GPU/TPU to train; the
parameter and GMAC counts are checked on CPU from shapes.

  python train.py --config configs/megaportraits_voxceleb2.py --workdir runs/vox --stage=backbone \
      --config.data.manual_dir=/data/voxceleb2
  python build_bank.py --config configs/megaportraits_voxceleb2.py --workdir runs/vox
  python train.py --config configs/megaportraits_voxceleb2.py --workdir runs/vox --stage=branches
  python train.py --config configs/megaportraits_voxceleb2.py --workdir runs/vox --stage=predictor
  python infer.py --config configs/megaportraits_voxceleb2.py --workdir runs/vox --sweep

`:sf3` / `:sf6` / `:sf15` select the other Table S9 scale factors; `:tiny` shrinks everything.
"""
from fiancee_jax import config as cfg


def get_config(arg=None):
  c = cfg.base_megaportraits()
  c.name = 'megaportraits_voxceleb2'
  c.data.name = 'video_frames'
  c.data.height = c.data.width = 512
  c.train.num_steps = 500_000
  c.branches.batch_size = 6       # S1.2.2: effective batch 6
  c.branches.num_steps = 200_000
  if arg in ('sf3', 'sf6', 'sf8', 'sf15'):
    c.branches.sf = 1.0 / int(arg[2:])
  elif arg == 'tiny':
    c.data.height = c.data.width = 32
    c.model.g2d_in, c.model.ch, c.model.up_channels = 16, 16, (8, 8, 8)
    c.model.enc_ch, c.model.motion_ch, c.model.expr_dim = 8, 8, 16
    c.branches.min_channels = 4
    c.train.batch_size = 2
    c.train.num_steps = 2
  elif arg is not None:
    raise ValueError(f"megaportraits_voxceleb2: unknown arg {arg!r}; expected sf3|sf6|sf8|sf15|tiny")
  return c

"""OASIS + FIANCEE on Cityscapes at the paper's settings (Sec. 4.1, S1.1; Tables 1, S8).

256x512, 35 semantic channels, full OASIS widths (71.11M params, 318.6 GMACs), SF 1/4
branches with min 64 channels, 5000 keys per class. Needs the user's Cityscapes download
and a GPU/TPU to train; its parameter and GMAC counts are checked on CPU from shapes.

  python train.py --config configs/oasis_cityscapes.py --workdir runs/cs --stage=backbone \
      --config.data.manual_dir=/data/cityscapes
  # or start from an official checkpoint:
  python -m fiancee_jax.backbones.oasis.torch_weights oasis_cityscapes/best_EMA.pth \
      --config configs/oasis_cityscapes.py --out runs/cs
  python build_bank.py --config configs/oasis_cityscapes.py --workdir runs/cs
  python train.py --config configs/oasis_cityscapes.py --workdir runs/cs --stage=branches
  python train.py --config configs/oasis_cityscapes.py --workdir runs/cs --stage=predictor
  python infer.py --config configs/oasis_cityscapes.py --workdir runs/cs --sweep

`:sf2` / `:sf3` select SF 1/2 or 1/3 (Table S8); `:tiny` shrinks everything for tests.
"""
from fiancee_jax import config as cfg


def get_config(arg=None):
  c = cfg.base_oasis()
  c.name = 'oasis_cityscapes'
  c.data.name = 'cityscapes'
  c.data.height, c.data.width = 256, 512
  c.train.num_steps = 200_000 * 20 // c.train.batch_size  # OASIS: 200 epochs x 2975 / bs 20
  c.branches.batch_size = 2 * 2     # S1.1.2: 2 GPUs x batch 2
  c.branches.num_steps = 200_000
  c.predictor.num_train = 500
  c.predictor.num_validation = 500
  c.predictor.num_test = 500
  c.predictor.num_steps = 50_000
  if arg in ('sf2', 'sf3', 'sf4'):
    c.branches.sf = {'sf2': 1 / 2, 'sf3': 1 / 3, 'sf4': 1 / 4}[arg]
  elif arg == 'tiny':
    c.data.height, c.data.width = 64, 128
    c.model.ch = 4
    c.disc.channels = (3, 8, 8, 16, 16, 32, 32)
    c.train.batch_size = 2
    c.train.num_steps = 2
  elif arg is not None:
    raise ValueError(f"oasis_cityscapes: unknown arg {arg!r}; expected sf2|sf3|sf4|tiny")
  return c

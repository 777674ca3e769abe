"""The head-avatar stages on `video_frames` (a user's VoxCeleb2-style folder): a generated
`dev/` + `test/` tree of mp4 clips and frame folders trains the backbone, gets one frame bank
per identity (that identity's frames, cut by FPS on the motion keys) and trains the branches,
through the same entry points as synthetic_heads. No foreground mask: the whole frame counts."""
import glob
import json
import os
import pathlib

import imageio.v2 as imageio
import jax
import numpy as np
import pytest
from PIL import Image

from fiancee_jax import config as cfg
from fiancee_jax import data as fdata
from fiancee_jax import registry
from fiancee_jax import workdir as wdir
from fiancee_jax.backbones.megaportraits import frame_banks
from fiancee_jax.core import stages
from fiancee_jax.data.builders import DataError
from fiancee_jax.train import branches as tbranches
from fiancee_jax.train import checkpoint, gan

SIZE = 32
FRAMES_PER_VIDEO = 4
BANK_FRAMES = 5      # identity 0 offers 7 frames (FPS keeps 5), identities 1 and 2 offer 4


def _frame(rng, h, w, colour, k):
  """A face-like disc of one identity's colour moving right with k, on smooth noise."""
  yy, xx = np.mgrid[:h, :w]
  img = (rng.uniform(40, 90, (h, w, 1)) + np.linspace(0, 60, w)[None, :, None]).repeat(3, -1)
  disc = (yy - h / 2) ** 2 + (xx - (w / 2 - 6 + 3 * k)) ** 2 < (h / 4) ** 2
  img[disc] = colour
  return img.clip(0, 255).astype(np.uint8)


def _vox_tree(root: pathlib.Path) -> None:
  """dev/id00012/{vidA/00001.mp4 (8 frames 32x48), vidB/*.png (3 frames 36x40)},
  dev/id00015/vidC/00001.mp4 (6 frames), test/id00017/vidD/*.png (5 frames)."""
  rng = np.random.default_rng(0)

  def clip(path, n, colour):
    path.parent.mkdir(parents=True)
    imageio.mimwrite(path, [_frame(rng, 32, 48, colour, k) for k in range(n)], fps=10,
                     macro_block_size=16)

  def pngs(folder, n, colour):
    folder.mkdir(parents=True)
    for k in range(n):
      Image.fromarray(_frame(rng, 36, 40, colour, k)).save(folder / f'{k:05d}.png')

  clip(root / 'dev' / 'id00012' / 'vidA' / '00001.mp4', 8, (220, 180, 150))
  pngs(root / 'dev' / 'id00012' / 'vidB', 3, (200, 160, 120))
  clip(root / 'dev' / 'id00015' / 'vidC' / '00001.mp4', 6, (120, 80, 50))
  pngs(root / 'test' / 'id00017' / 'vidD', 5, (240, 210, 190))


def _config(root: pathlib.Path):
  c = cfg.load(os.path.join(os.path.dirname(__file__), '..', '..', 'configs',
                            'megaportraits_synthetic.py'), 'tiny')
  c.data.name = 'video_frames'
  c.data.manual_dir = str(root / 'vox')
  c.data.data_dir = str(root / 'data')
  c.data.frames_per_video = FRAMES_PER_VIDEO
  c.train.batch_size = 4           # divides by the 4 test devices
  c.branches.batch_size = 4
  c.branches.exits = (4,)          # one exit: the smallest branch step to compile
  c.branches.ckpt_every = 1
  c.bank.frames_per_identity = BANK_FRAMES
  c.train.loss_weights.vgg = 0.0   # keep the CPU test small (VGG19 has its own tests)
  return cfg.validate(c)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """One workdir through backbone (2 steps) -> frame banks -> branches (2 steps)."""
  root = tmp_path_factory.mktemp('video_frames')
  _vox_tree(root / 'vox')
  c = _config(root)
  wd = str(root / 'wd')
  metrics = []
  adapter = registry.get(c)
  bb = gan.train_and_evaluate(adapter, wd,
                              hooks=[lambda step, s, m: metrics.append(jax.device_get(m))])
  banks = stages.build_bank(adapter, wd, batch_size=4, progress=False)   # a bank per identity
  br = tbranches.train_and_evaluate(adapter, wd)
  return dict(config=c, workdir=wd, backbone=bb, backbone_metrics=metrics, banks=banks,
              branches=br)


def test_dataset_splits_and_no_mask(run):
  c = run['config']
  train = fdata.source(c.data, 'train', c.data.data_dir)
  test = fdata.source(c.data, 'test', c.data.data_dir)
  ids = [int(train[i]['identity']) for i in range(len(train))]
  assert ids == [0] * 7 + [1] * 4                   # 4 of vidA's 8 + vidB's 3; 4 of vidC's 6
  assert [int(test[i]['identity']) for i in range(len(test))] == [2] * 4
  assert train[0]['image'].shape == (SIZE, SIZE, 3)
  with pytest.raises(DataError, match="split 'validation' not available"):
    fdata.source(c.data, 'validation', c.data.data_dir)
  # Self-reenactment pairs within one video; every pixel is foreground.
  batch = next(registry.get(c).gan_task().loader(train, 4, seed=0))
  assert batch['driver_mask'].shape == (4, SIZE, SIZE) and (batch['driver_mask'] == 255).all()
  assert 'driver_pose' not in batch
  pairs = fdata.reenactment_pairs(train, c.seed)
  assert all(pairs[i]['source_video'] == pairs[i]['driver_video'] for i in range(len(pairs)))


def test_backbone_stage(run):
  c, wd = run['config'], run['workdir']
  assert int(run['backbone'].step) == c.train.num_steps == 2
  m = run['backbone_metrics']
  assert len(m) == 2 and all(np.isfinite(float(v)) for x in m for v in x.values())
  assert 'g_angles' not in m[0]                     # no head poses in video_frames
  assert 0 < float(m[0]['g_l1']) < 2                # L1 over the whole (unmasked) frame
  assert sorted(os.listdir(wdir.checkpoint_dir(wd, 'backbone'))) == ['2']
  pngs = sorted(glob.glob(os.path.join(wd, 'samples', 'step_*.png')))
  assert [os.path.basename(p) for p in pngs] == ['step_0000002.png']
  assert Image.open(pngs[0]).size == (4 * SIZE, 4 * SIZE)   # 4 self-reenactment rows only


def test_frame_bank_per_identity(run):
  c, wd = run['config'], run['workdir']
  assert sorted(run['banks']) == [0, 1, 2]
  index = frame_banks.dataset_frames(c, c.data.data_dir)
  params, coll, meta = checkpoint.load_backbone(wd, c)
  adapter = registry.get(c)
  model = adapter.generator()
  srcs = {s: fdata.source(c.data, s, c.data.data_dir) for s in index}
  for ident, available in ((0, 7), (1, 4), (2, 4)):
    m = run['banks'][ident]
    split = 'test' if ident == 2 else 'train'
    assert m['count'] == min(BANK_FRAMES, available)
    assert m['grid'] == [1, 1] and m['num_classes'] == 1 and m['backbone_step'] == meta['step']
    assert m['value_shape'] == [SIZE, SIZE, 3] and m['key_dim'] == 3 + c.model.expr_dim
    assert m['meta']['identity'] == ident and m['meta']['frames'] == 'dataset'
    assert m['meta']['examples'] == [[split, i] for i in index[split][ident]]
    frames = np.stack([srcs[split][i]['image'] for i in index[split][ident]])
    frames = frames.astype(np.float32) / 127.5 - 1.0
    bank = frame_banks.load_bank(c, adapter.bank_shapes(), wd, ident, backbone_step=meta['step'])
    values = np.asarray(bank.values)
    # each value is one of this identity's dataset frames, no frame twice
    dist = np.abs(values[:, None] - frames[None]).max((2, 3, 4))
    order = dist.argmin(1)
    assert (dist.min(1) < 1e-6).all() and len(set(order.tolist())) == len(order)
    keys = np.asarray(frame_banks.motion_keys(model, {'params': params, **coll}, frames))
    np.testing.assert_allclose(np.asarray(bank.keys), keys[order], rtol=1e-4, atol=1e-4)
    if available > BANK_FRAMES:
      # FPS on the keys from the identity's first frame: each pick is (up to float ties) the
      # frame farthest from the frames picked before it
      assert order[0] == 0
      for j in range(1, len(order)):
        d = ((keys[:, None] - keys[order[:j]][None]) ** 2).sum(-1).min(1)
        assert d[order[j]] >= d.max() * (1 - 1e-3), (ident, j, d)
  with open(os.path.join(wdir.identity_bank_dir(wd, 0), 'manifest.json')) as f:
    assert json.load(f)['meta']['data'] == 'video_frames'


def test_branch_stage(run):
  c, wd = run['config'], run['workdir']
  st = run['branches']
  assert int(st.step) == c.branches.num_steps == 2
  assert sorted(os.listdir(wdir.checkpoint_dir(wd, 'branches'))) == ['1', '2']
  pngs = sorted(glob.glob(os.path.join(wd, 'samples', 'branches_*.png')))
  assert [os.path.basename(p) for p in pngs] == ['branches_0000002.png']
  # source | driver | bank frame | backbone | exit 4; 4 self rows + 4 other-identity drivers
  assert Image.open(pngs[0]).size == (5 * SIZE, 8 * SIZE)
  p = stages.load_pipeline(registry.get(c), wd, stages=('backbone', 'bank', 'branches'))
  assert p.params['bank'].bank.keys.shape[0] == BANK_FRAMES + 4 + 4   # identities 0, 1, 2
  jax.tree.map(np.testing.assert_array_equal, p.params['branches']['params'], st.params_b)

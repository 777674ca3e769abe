"""Inference inputs: thresholds, label PNGs, head-avatar images and flags end in one message,
before any stage is loaded."""
import numpy as np
import pytest
from PIL import Image

from fiancee_jax import registry
from fiancee_jax.backbones.megaportraits import inputs as head_inputs
from fiancee_jax.infer import engine, inputs
from fiancee_jax.infer.inputs import InferError
from tests.conftest import heads_config, tiny_config


def _png(path, array):
  Image.fromarray(np.asarray(array, np.uint8)).save(path)
  return str(path)


@pytest.mark.parametrize('bad', [0, -0.1, float('nan'), float('inf'), 'abc'])
def test_bad_threshold(bad):
  with pytest.raises(InferError, match='threshold'):
    inputs.check_threshold(bad)


def test_bad_label_png(tmp_path):
  c = tiny_config()
  wrong = tmp_path / 'wrong.png'
  Image.fromarray(np.zeros((32, 48), np.uint8)).save(wrong)
  with pytest.raises(InferError, match='size 32x48'):
    inputs.read_label(str(wrong), c)
  unknown = tmp_path / 'unknown.png'
  ids = np.zeros((c.data.height, c.data.width), np.uint8)
  ids[3, 4] = 200
  Image.fromarray(ids).save(unknown)
  with pytest.raises(InferError, match=r'unknown class ids \[200\]'):
    inputs.read_label(str(unknown), c)
  ok = tmp_path / 'ok.png'
  ids[3, 4] = 7
  Image.fromarray(ids).save(ok)
  assert inputs.read_label(str(ok), c)[3, 4] == 7


def test_missing_stage(tmp_path):
  c = tiny_config()
  with pytest.raises(ValueError, match='backbone.*train.py'):
    engine.load(registry.get(c), str(tmp_path))


@pytest.mark.parametrize('bad', [0, -0.1, float('nan'), 'nan'])
def test_bad_threshold_before_any_stage(tmp_path, bad):
  with pytest.raises(InferError, match='threshold'):
    engine.infer_file(registry.get(heads_config()), str(tmp_path / 'none'), source_index=0,
                      driver_index=1, threshold=bad)


def test_bad_images_and_flags(tmp_path):
  c = heads_config(tmp_path / 'data')
  bb = registry.get(c)
  size = c.data.height
  small = _png(tmp_path / 'small.png', np.zeros((16, 24, 3)))
  ok = _png(tmp_path / 'ok.png', np.full((size, size, 3), 200))
  with pytest.raises(InferError, match=rf'--driver=.*size 16x24 .*expects {size}x'):
    inputs.read_image(small, c, 'driver')
  with pytest.raises(InferError, match='--source=.*no such file'):
    inputs.read_image(str(tmp_path / 'missing.png'), c, 'source')
  grey = _png(tmp_path / 'grey.png', np.full((size, size), 7))
  assert inputs.read_image(grey, c, 'source').shape == (size, size, 3)
  kw = dict(source=None, driver=ok, source_index=None, driver_index=None, identity=None)
  with pytest.raises(InferError, match='exactly one of --source'):
    head_inputs.pair_inputs(c, str(tmp_path), **kw)
  with pytest.raises(InferError, match='needs --identity'):
    head_inputs.pair_inputs(c, str(tmp_path), **dict(kw, source=ok))
  with pytest.raises(InferError, match='exactly one of --driver'):
    head_inputs.pair_inputs(c, str(tmp_path), **dict(kw, source=ok, identity=1, driver_index=0))
  src, drv, ident, name = head_inputs.pair_inputs(c, str(tmp_path), **dict(kw, source=ok,
                                                                           identity=4))
  assert ident == 4 and name == 'ok_by_ok' and src.dtype == np.uint8
  with pytest.raises(InferError, match='head-avatar config.*not --label'):
    engine.infer_file(bb, str(tmp_path), label=ok)
  with pytest.raises(InferError, match=r'--identity=99: .*one of \[0, 1, 2, 3, 4\]'):
    head_inputs.check_identity(c, str(tmp_path), 99)
  # the adapter's request: batch-1 route inputs in [-1, 1], only the identity's bank
  req = bb.infer_inputs().from_flags(str(tmp_path), dict(kw, source=ok, identity=4))
  assert [x.shape for x in req.inputs] == [(1, size, size, 3), (1, size, size, 3), (1,)]
  assert req.bank_select == {'identities': [4]} and req.name == 'ok_by_ok'
  with pytest.raises(InferError, match='OASIS config.*not the head-avatar flags'):
    registry.get(tiny_config()).infer_inputs().from_flags(str(tmp_path), dict(kw, source=ok))

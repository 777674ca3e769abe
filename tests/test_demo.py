"""`make demo`'s shipped artifacts: copied into a workdir that lacks them, never over one that
has them, one clear error when the shipped folder lacks a stage."""
import os

import pytest

from fiancee_jax import demo


def _tree(root, rel, text):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)


def test_copy_shipped(tmp_path):
  shipped, work = str(tmp_path / 'assets'), str(tmp_path / 'wd')
  _tree(shipped, 'checkpoints/branches/7/state', 'shipped')
  _tree(shipped, 'checkpoints/backbone/9/state', 'shipped')
  src = demo._copy_shipped('branches', {'branches': shipped}, work)
  assert src == os.path.join(shipped, 'checkpoints', 'branches')
  with open(os.path.join(work, 'checkpoints/branches/7/state')) as f:
    assert f.read() == 'shipped'
  assert not os.path.exists(os.path.join(work, 'checkpoints', 'branches.copying'))
  # the workdir's own output wins
  _tree(work, 'checkpoints/backbone/9/state', 'mine')
  assert demo._copy_shipped('backbone', {'backbone': shipped}, work) is None
  with open(os.path.join(work, 'checkpoints/backbone/9/state')) as f:
    assert f.read() == 'mine'
  assert demo._copy_shipped('bank', {'bank': shipped}, work) is None   # never shipped
  assert demo._copy_shipped('branches_nobank', {'branches_nobank': None}, work) is None
  with pytest.raises(FileNotFoundError, match='branches_nobank'):
    demo._copy_shipped('branches_nobank', {'branches_nobank': shipped}, work)

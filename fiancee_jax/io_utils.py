"""Kill-safe file writes: the one helper every JSON / npz / PNG / markdown writer uses.

`atomic_open(path)` gives a binary file on a temporary file next to `path`
(`.<name>.tmp-<pid>-<random>`); on a clean exit it flushes, fsyncs and `os.replace`s it onto
`path` (then fsyncs the folder), so a reader finds the old complete file or the new complete
one, never part of one, even after `kill -9`. On an exception the temporary file is removed.
A temporary file or folder that a killed process left next to `path` (its pid no longer runs)
is removed, with one printed line, by the next write of `path` (`remove_stale`; the bank build
uses the same names for its temporary folders). `atomic_write(path, data)`: bytes or str in
one call.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from typing import BinaryIO, Iterator


def temp_path(path: str | os.PathLike) -> str:
  """A fresh temporary name for `path` in the same folder (same file system: os.replace is
  atomic), tagged with this process's pid so `remove_stale` knows when its writer is gone."""
  path = os.path.abspath(os.fspath(path))
  d, name = os.path.split(path)
  return os.path.join(d, f'.{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}')


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def remove_stale(path: str | os.PathLike) -> list[str]:
  """Remove the temporary files / folders of `path` (`temp_path` names) whose writing process
  is gone (killed mid-write); says so in one line. Returns the removed paths."""
  path = os.path.abspath(os.fspath(path))
  d, name = os.path.split(path)
  pattern = re.compile(rf'\.{re.escape(name)}\.tmp-(\d+)-[0-9a-f]+$')
  try:
    entries = os.listdir(d)
  except FileNotFoundError:
    return []
  removed = []
  for entry in sorted(entries):
    m = pattern.match(entry)
    if m is None or _alive(int(m.group(1))):
      continue
    p = os.path.join(d, entry)
    if os.path.isdir(p) and not os.path.islink(p):
      shutil.rmtree(p, ignore_errors=True)
    else:
      with contextlib.suppress(FileNotFoundError):
        os.remove(p)
    removed.append(p)
  if removed:
    print(f'[io] {path}: removed what a killed write left half-written: '
          + ', '.join(os.path.basename(p) for p in removed), flush=True)
  return removed


def _fsync_dir(d: str) -> None:
  try:
    fd = os.open(d, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
  """`with atomic_open(path) as f: f.write(...)`: `path` is replaced only when the block ends
  without an exception (temporary file in the same folder, flush + fsync, os.replace)."""
  path = os.path.abspath(os.fspath(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  remove_stale(path)
  tmp = temp_path(path)
  try:
    with open(tmp, 'wb') as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  _fsync_dir(os.path.dirname(path))


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
  """Write `data` (str: UTF-8) to `path` atomically (see `atomic_open`)."""
  with atomic_open(path) as f:
    f.write(data.encode() if isinstance(data, str) else data)

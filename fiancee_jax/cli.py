"""What the absl entry scripts (train.py, build_bank.py, infer.py) share: flag parsing that
answers a bad flag with one line, the persistent compilation cache, the process's start time.

  app.run(main, flags_parser=cli.flags_parser('train.py'))
  cli.compilation_cache(FLAGS.workdir)    # in main, before the first compile

absl prints a bad flag value as 'FATAL Flags parsing error: ...' plus a hint line, and
ml_collections lets an override of a key the config does not have (`--config.train.nokey=1`)
escape flag parsing as an AttributeError traceback. Both end here in one line
`<script>: <flag>: <what was expected>` and exit status 1; no stage has run, nothing is written.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
import time
from typing import Callable, Sequence

from absl import flags

from fiancee_jax import workdir as wd

_OVERRIDE = re.compile(r'^--?(?:no)?config\.([^=]+)')


def flags_parser(script: str) -> Callable[[Sequence[str]], list[str]]:
  """An absl `flags_parser` for `app.run`: parse argv; a bad flag exits with one line."""
  def parse(argv: Sequence[str]) -> list[str]:
    try:
      rest = flags.FLAGS(list(argv))
    except flags.Error as e:
      sys.exit(f'{script}: {_one_line(str(e))} (--helpfull lists the flags)')
    except (AttributeError, KeyError):  # ml_collections: --config.<key> the config lacks
      why = unknown_override(argv)
      if why is None:  # not an override of a missing key: a bug, keep the traceback
        raise
      sys.exit(f'{script}: {why}')
    import ml_collections  # noqa: PLC0415
    config = flags.FLAGS['config'].value if 'config' in flags.FLAGS else None
    if config is not None and not isinstance(config, ml_collections.ConfigDict):
      # ml_collections keeps a config file it could not open as an object that raises later
      sys.exit(f'{script}: --config={_config_spec(argv)!r}: no such config file; expected '
               'a Python file with get_config(), e.g. configs/oasis_synthetic.py[:tiny]')
    return rest
  return parse


def _one_line(message: str) -> str:
  """absl / ml_collections messages that carry a traceback (an exception raised by a config
  file's get_config): their first line + the exception's own line."""
  lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
  return lines[0] if len(lines) < 2 else f'{lines[0]} {lines[-1]}'


def _config_spec(argv: Sequence[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(('--config=', '-config=')):
      return arg.split('=', 1)[1]
    if arg in ('--config', '-config') and i + 1 < len(argv):
      return argv[i + 1]
  return None


def unknown_override(argv: Sequence[str]) -> str | None:
  """'<arg>: unknown config key ...; expected ...' for the first `--config.a.b` override in
  argv that names no key of the --config file's config (None when every key exists)."""
  import ml_collections  # noqa: PLC0415
  from fiancee_jax import config as cfg  # noqa: PLC0415
  spec = _config_spec(argv)
  if spec is None:
    return None
  try:
    config = cfg.load(spec)
  except Exception:  # noqa: BLE001 - the config itself fails: not this error
    return None
  for arg in argv:
    m = _OVERRIDE.match(arg)
    if not m:
      continue
    parts = m.group(1).split('.')
    node = config
    for i, part in enumerate(parts):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        continue
      where = '.'.join(['config', *parts[:i]])
      if not isinstance(node, ml_collections.ConfigDict):
        return (f'{arg}: unknown config key {m.group(1)!r}: {where} is a value '
                f'({type(node).__name__}), not a section')
      keys = sorted(node.keys())
      close = difflib.get_close_matches(part, keys, 1)
      hint = f'did you mean {where}.{close[0]}? ' if close else ''
      return (f'{arg}: unknown config key {m.group(1)!r} ({where} has no {part!r}); '
              f'{hint}expected one of {where}: {", ".join(keys)}')
  return None


# Compiles faster than this are not worth a cache file (a read costs ~ms): the tiny eager ops
# stay out, every jitted stage, route and predictor function goes in.
CACHE_MIN_COMPILE_S = 0.05
CACHE_MAX_BYTES = 4 << 30   # a bound turns on jax's file lock: processes may share a workdir


def compilation_cache(workdir: str, must_exist: bool = True) -> str | None:
  """Use `<workdir>/xla_cache` as jax's persistent compilation cache (a second run of the same
  command loads its programs instead of compiling them); call once, before the first compile.
  Returns the directory used, or None: a cache dir already set (JAX_COMPILATION_CACHE_DIR, or
  a test session's) is kept and returned as is; with `must_exist`, a workdir that does not
  exist is left alone (the command fails on it anyway, and must not create it)."""
  import jax  # noqa: PLC0415 (the flag parsers above must not import jax)
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if must_exist and not os.path.isdir(workdir):
    return None
  path = wd.xla_cache_dir(workdir)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', CACHE_MIN_COMPILE_S)
  jax.config.update('jax_compilation_cache_max_size', CACHE_MAX_BYTES)
  return path


def process_start_time() -> float:
  """When this process started, on the `time.time()` clock (Linux: /proc/self/stat, so the
  interpreter's start and every import count); elsewhere the time of this module's import."""
  try:
    with open('/proc/self/stat') as f:
      ticks = int(f.read().rsplit(')', 1)[1].split()[19])   # field 22: starttime
    with open('/proc/uptime') as f:
      uptime = float(f.read().split()[0])
    return time.time() - (uptime - ticks / os.sysconf('SC_CLK_TCK'))
  except (OSError, ValueError, IndexError):
    return _IMPORTED


_IMPORTED = time.time()

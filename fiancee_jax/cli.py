"""What the absl entry scripts (train.py, build_bank.py, infer.py) share: flag parsing that
answers a bad flag with one line.

  app.run(main, flags_parser=cli.flags_parser('train.py'))

absl prints a bad flag value as 'FATAL Flags parsing error: ...' plus a hint line, and
ml_collections lets an override of a key the config does not have (`--config.train.nokey=1`)
escape flag parsing as an AttributeError traceback. Both end here in one line
`<script>: <flag>: <what was expected>` and exit status 1; no stage has run, nothing is written.
"""
from __future__ import annotations

import difflib
import re
import sys
from typing import Callable, Sequence

from absl import flags

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

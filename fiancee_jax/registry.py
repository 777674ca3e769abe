"""`config.backbone` -> its FIANCEE adapter: the one place that reads that string.

Entry points (train.py, build_bank.py, infer.py, the flops CLI, the demo, benchmarks) call
`get(config)` once and hand the adapter down; nothing else tests the backbone's name. A new
backbone is a `fiancee_jax.core.interface.Backbone` subclass added here (or, for an experiment
or a test, with `register`).
"""
from __future__ import annotations

from fiancee_jax.backbones.megaportraits.adapter import MegaPortraits
from fiancee_jax.backbones.oasis.adapter import OASIS
from fiancee_jax.config import ConfigError
from fiancee_jax.core.interface import Backbone

_ADAPTERS: dict[str, type[Backbone]] = {OASIS.name: OASIS, MegaPortraits.name: MegaPortraits}


def register(cls: type[Backbone]) -> type[Backbone]:
  """Add an adapter class (keyed by its `name`); returns it, so it works as a decorator."""
  if not (isinstance(cls, type) and issubclass(cls, Backbone)):
    raise TypeError(f'register: expected a Backbone subclass, got {cls!r}')
  _ADAPTERS[cls.name] = cls
  return cls


def names() -> list[str]:
  return sorted(_ADAPTERS)


def get(config) -> Backbone:
  """The adapter of `config.backbone`, made for this config."""
  name = config.get('backbone') if hasattr(config, 'get') else getattr(config, 'backbone', None)
  cls = _ADAPTERS.get(name)
  if cls is None:
    raise ConfigError(f'config.backbone={name!r}: expected one of {names()}')
  return cls(config)

"""Deterministic, shardable, resumable batch loader over a random-access source.

Epoch e visits the source in the order `permutation(seed, e)` (numpy Generator seeded by
[seed, e]; identity order without shuffling). Global batch b of that epoch is the slice
[b*B, (b+1)*B) of the order; process p of P takes its contiguous share of it (B/P examples),
so processes see disjoint examples that together cover the epoch. The position is two
integers (epoch, batch): `state()` returns them with the settings that fix the stream, and a
Loader built with that state continues exactly where the saved one stopped.
"""
from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
from fiancee_jax.errors import FianceeError


class LoaderError(FianceeError):
  """Impossible loader settings or a saved state that does not fit this loader."""


def collate(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  """List of dicts of arrays/scalars -> dict of stacked numpy arrays."""
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


class Loader:
  """Iterator of dict-of-numpy batches (this process's share of each global batch).

  Args:
    source: random-access source (`len`, `__getitem__(int) -> dict`).
    batch_size: global batch size (over all processes); must divide by process_count.
    seed: shuffling seed. shuffle: permute each epoch (else source order).
    drop_remainder: drop the last, incomplete global batch of each epoch. Without it the
      last batch is smaller (split over processes with `np.array_split`).
    process_index / process_count: this process's shard (jax.process_index/count()).
    state: a dict from `state()` to resume from.
    transform: optional `fn(example) -> example` applied after reading.
    num_epochs: stop after this many epochs (None = forever).
    num_threads: read the examples of a batch with this many threads (0 = in the caller).
  """

  def __init__(self, source: Any, batch_size: int, *, seed: int, shuffle: bool = True,
               drop_remainder: bool = True, process_index: int = 0, process_count: int = 1,
               state: Optional[dict[str, Any]] = None,
               transform: Optional[Callable[[dict], dict]] = None,
               num_epochs: Optional[int] = None, num_threads: int = 0):
    n = len(source)
    if batch_size <= 0 or batch_size % process_count:
      raise LoaderError(f'batch_size={batch_size}: expected a positive multiple of '
                        f'process_count={process_count}')
    if not 0 <= process_index < process_count:
      raise LoaderError(f'process_index={process_index}: expected in [0, {process_count})')
    if n == 0 or (drop_remainder and n < batch_size):
      raise LoaderError(f'source has {n} examples: fewer than one global batch of {batch_size}'
                        + (' (drop_remainder=True)' if drop_remainder else ''))
    self.source, self.batch_size = source, batch_size
    self.seed, self.shuffle, self.drop_remainder = int(seed), shuffle, drop_remainder
    self.process_index, self.process_count = process_index, process_count
    self.transform, self.num_epochs = transform, num_epochs
    self._n = n
    self._batches_per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
    self._epoch, self._batch = 0, 0
    self._order_epoch, self._order = -1, None
    self._pool = (concurrent.futures.ThreadPoolExecutor(num_threads) if num_threads > 0
                  else None)
    if state is not None:
      self._restore(state)

  # --- position ---------------------------------------------------------------------------
  def state(self) -> dict[str, Any]:
    """JSON-able position of the next batch + the settings that fix the stream."""
    return {'epoch': self._epoch, 'batch': self._batch, 'seed': self.seed,
            'num_examples': self._n, 'batch_size': self.batch_size, 'shuffle': self.shuffle,
            'drop_remainder': self.drop_remainder}

  def _restore(self, state: dict[str, Any]):
    mismatched = [f'{k}: saved {state.get(k)!r}, loader {v!r}' for k, v in self.state().items()
                  if k not in ('epoch', 'batch') and k in state and state[k] != v]
    if mismatched or 'epoch' not in state or 'batch' not in state:
      raise LoaderError('loader state does not fit this loader (the data stream would not '
                        'continue): ' + ('; '.join(mismatched) or f'missing epoch/batch in {state}'))
    self._epoch, self._batch = int(state['epoch']), int(state['batch'])
    if not 0 <= self._batch < self._batches_per_epoch:
      raise LoaderError(f'loader state batch={self._batch}: expected in '
                        f'[0, {self._batches_per_epoch})')

  @property
  def batches_per_epoch(self) -> int:
    return self._batches_per_epoch

  def order(self, epoch: int) -> np.ndarray:
    """Global visiting order of an epoch (same in every process)."""
    if epoch != self._order_epoch:
      self._order = (np.random.default_rng([self.seed, epoch]).permutation(self._n)
                     if self.shuffle else np.arange(self._n))
      self._order_epoch = epoch
    return self._order

  def indices(self, epoch: int, batch: int) -> np.ndarray:
    """Source indices of this process's share of global batch `batch` of `epoch`."""
    glob = self.order(epoch)[batch * self.batch_size:(batch + 1) * self.batch_size]
    return np.array_split(glob, self.process_count)[self.process_index]

  # --- iteration --------------------------------------------------------------------------
  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_epochs is not None and self._epoch >= self.num_epochs:
      raise StopIteration
    idx = self.indices(self._epoch, self._batch)
    self._batch += 1
    if self._batch >= self._batches_per_epoch:
      self._epoch, self._batch = self._epoch + 1, 0
    read = self._read
    examples = list(self._pool.map(read, idx)) if self._pool else [read(i) for i in idx]
    return collate(examples)

  def _read(self, i: int) -> dict[str, Any]:
    ex = self.source[int(i)]
    return self.transform(ex) if self.transform is not None else ex

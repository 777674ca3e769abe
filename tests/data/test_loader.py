"""Loader: deterministic shuffling, per-process sharding, drop_remainder, exact resume."""
import json

import numpy as np
import pytest

from fiancee_jax.data import Loader, LoaderError


class Range:
  """A random-access source whose example i is {'x': i, 'v': [i, 2i]}."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'x': np.int64(i), 'v': np.array([i, 2 * i], np.float32)}


def _take(loader, k):
  return [next(loader)['x'].tolist() for _ in range(k)]


def test_shuffle_deterministic_and_seeded():
  a = _take(Loader(Range(20), 4, seed=1), 5)
  assert a == _take(Loader(Range(20), 4, seed=1), 5)
  assert a != _take(Loader(Range(20), 4, seed=2), 5)
  assert sorted(sum(a, [])) == list(range(20))     # one epoch = each example once
  b = _take(Loader(Range(20), 4, seed=1), 10)
  assert b[5:] != b[:5]                             # a new permutation each epoch
  assert _take(Loader(Range(8), 4, seed=0, shuffle=False), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_two_processes_disjoint_and_covering():
  n, bs = 24, 8
  shards = [Loader(Range(n), bs, seed=3, process_index=p, process_count=2) for p in range(2)]
  seen = [sum(_take(s, n // bs), []) for s in shards]
  assert all(len(s) == n // 2 for s in seen)
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(n))
  # Each process's batch is its half of the single-process global batch.
  whole = _take(Loader(Range(n), bs, seed=3), 1)[0]
  assert seen[0][:4] + seen[1][:4] == whole


def test_drop_remainder():
  assert len(_take(Loader(Range(10), 4, seed=0), 2)[1]) == 4
  loader = Loader(Range(10), 4, seed=0, drop_remainder=False, num_epochs=1)
  sizes = [len(b['x']) for b in loader]
  assert sizes == [4, 4, 2]
  assert Loader(Range(10), 4, seed=0).batches_per_epoch == 2


def test_resume_continues_the_stream():
  ref = Loader(Range(30), 4, seed=5, process_index=1, process_count=2)
  first = _take(ref, 9)                             # crosses an epoch boundary (7 / epoch)
  state = json.loads(json.dumps(ref.state()))       # JSON round trip, as in a checkpoint
  rest = _take(ref, 6)
  resumed = Loader(Range(30), 4, seed=5, process_index=1, process_count=2, state=state)
  assert _take(resumed, 6) == rest
  whole = _take(Loader(Range(30), 4, seed=5, process_index=1, process_count=2), 15)
  assert whole == first + rest
  batch = next(Loader(Range(30), 4, seed=5, state=state))
  assert batch['v'].shape == (4, 2) and batch['v'].dtype == np.float32


def test_bad_settings_and_mismatched_state():
  with pytest.raises(LoaderError, match='process_count'):
    Loader(Range(10), 3, seed=0, process_count=2)
  with pytest.raises(LoaderError, match='fewer than one global batch'):
    Loader(Range(3), 4, seed=0)
  state = Loader(Range(10), 2, seed=0).state()
  with pytest.raises(LoaderError, match='seed: saved 0, loader 1'):
    Loader(Range(10), 2, seed=1, state=state)
  with pytest.raises(LoaderError, match='num_examples'):
    Loader(Range(12), 2, seed=0, state=state)


def test_threads_give_the_same_batches():
  a = _take(Loader(Range(16), 4, seed=0), 4)
  assert _take(Loader(Range(16), 4, seed=0, num_threads=2), 4) == a

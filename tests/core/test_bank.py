"""Guiding bank: FPS, both retrieval backends vs numpy, glue layout, build/save/load, errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiancee_jax.core import bank as bk


def fps_numpy(x, k, start=0):
  """Brute-force farthest-point sampling in float64 (the reference)."""
  x = np.asarray(x, np.float64)
  if len(x) <= k:
    return np.arange(len(x))
  min_d = np.full(len(x), np.inf)
  min_d[start] = -np.inf
  sel = [start]
  for _ in range(k - 1):
    d = ((x - x[sel[-1]]) ** 2).sum(1)
    min_d = np.minimum(min_d, d)
    nxt = int(np.argmax(min_d))
    sel.append(nxt)
    min_d[nxt] = -np.inf
  return np.array(sel)


def nn_numpy(keys, key_cls, q, q_cls):
  """Exact nearest key of the same class (all keys when the class has none), float64."""
  keys = np.asarray(keys, np.float64)
  q = np.asarray(q, np.float64).reshape(-1, keys.shape[1])
  out = []
  for v, c in zip(q, np.asarray(q_cls).reshape(-1)):
    d = ((keys - v) ** 2).sum(1)
    if (key_cls == c).any():
      d = np.where(key_cls == c, d, np.inf)
    out.append(int(np.argmin(d)))
  return np.array(out).reshape(np.shape(q_cls))


@pytest.mark.parametrize('seed,start', [(0, 0), (1, 7), (2, 0)])
def test_fps_matches_numpy_brute_force(seed, start):
  x = np.random.default_rng(seed).normal(size=(300, 16)).astype(np.float32)
  got = bk.fps(x, 40, start=start)
  np.testing.assert_array_equal(got, fps_numpy(x, 40, start))
  # Padding rows past num_valid (huge, would be picked first) never take part.
  padded = np.concatenate([x, np.full((50, 16), 1e3, np.float32)])
  np.testing.assert_array_equal(bk.fps(padded, 40, num_valid=300, start=start), got)


def test_fps_duplicates_and_small_sets():
  x = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)  # 3 distinct points, 4 copies each
  got = bk.fps(x, 6)
  assert len(set(got.tolist())) == 6          # never the same point twice
  assert sorted(set((got // 4)[:3].tolist())) == [0, 1, 2]  # first the 3 distinct points
  np.testing.assert_array_equal(bk.fps(x[:5], 8), np.arange(5))


def _random_bank(rng, n=500, d=24, num_classes=7, empty=(5,), vshape=(2, 3, 4)):
  keys = rng.normal(size=(n, d)).astype(np.float32)
  cls = rng.integers(0, num_classes, size=n)
  for e in empty:
    cls[cls == e] = 0
  values = rng.normal(size=(n,) + vshape).astype(np.float32)
  return bk.make_bank(keys, values, cls, num_classes), keys, cls, values


@pytest.mark.parametrize('backend,query_tile', [('device', 32), ('device', 3), ('faiss', 32)])
def test_nearest_matches_numpy(backend, query_tile):
  rng = np.random.default_rng(3)
  bank, *_ = _random_bank(rng)
  keys, cls = bank.host.keys, bank.host.key_classes  # rows as stored (sorted by class)
  q = rng.normal(size=(2, 4, 8, 24)).astype(np.float32)
  qc = rng.integers(0, 7, size=(2, 4, 8))
  qc[0, 0, :4] = 5        # a class with no keys -> all keys
  qc[1, 0, :2] = 99       # an id outside [0, num_classes) -> all keys
  f = jax.jit(bk.nearest, static_argnames=('backend', 'query_tile'))
  got = f(bank, jnp.asarray(q), jnp.asarray(qc), backend=backend, query_tile=query_tile)
  want = nn_numpy(keys, cls, q, qc)
  np.testing.assert_array_equal(np.asarray(got), want)
  # Same-class constraint really restricts: unconstrained NN differs for many queries.
  free = nn_numpy(keys, np.zeros_like(cls), q, np.zeros_like(qc))
  assert (free != want).mean() > 0.3


def test_make_bank_sorts_rows_by_class():
  rng = np.random.default_rng(5)
  bank, keys, cls, values = _random_bank(rng, n=60)
  kc = np.asarray(bank.key_classes)
  assert (np.diff(kc) >= 0).all() and np.asarray(bank.class_counts).sum() == 60
  np.testing.assert_array_equal(np.asarray(bank.class_offsets)[kc[-1]], np.flatnonzero(kc == kc[-1])[0])
  order = np.argsort(cls, kind='stable')
  np.testing.assert_array_equal(np.asarray(bank.keys), keys[order])
  np.testing.assert_array_equal(np.asarray(bank.values), values[order])


def test_faiss_callback_under_vmap_and_no_classes():
  rng = np.random.default_rng(4)
  keys = rng.normal(size=(200, 8)).astype(np.float32)
  bank = bk.make_bank(keys, rng.normal(size=(200, 1, 1, 3)).astype(np.float32))  # one class
  q = jnp.asarray(rng.normal(size=(3, 1, 2, 5, 8)).astype(np.float32))
  f = jax.jit(jax.vmap(lambda b, x: bk.retrieve(b, x, backend='faiss'), in_axes=(None, 0)))
  g = jax.jit(lambda b, x: bk.retrieve(b, x, backend='device'))
  want = np.stack([np.asarray(g(bank, x)) for x in q])
  np.testing.assert_array_equal(np.asarray(f(bank, q)), want)
  idx = nn_numpy(keys, np.zeros(200), q[:, 0], np.zeros((3, 2, 5)))
  np.testing.assert_array_equal(want[:, 0, :, :, 0], np.asarray(bank.values)[idx][..., 0, 0, 0])


def test_glue_layout():
  n, ph, pw = 20, 3, 2
  values = np.zeros((n, ph, pw, 3), np.float32)
  values[..., 0] = np.arange(n)[:, None, None]
  values[..., 1] = np.arange(ph)[None, :, None]
  values[..., 2] = np.arange(pw)[None, None, :]
  idx = np.random.default_rng(0).integers(0, n, size=(2, 4, 5))
  guide = np.asarray(bk.glue(jnp.asarray(values), jnp.asarray(idx)))
  assert guide.shape == (2, 4 * ph, 5 * pw, 3)
  for b, i, j, y, x in [(0, 0, 0, 0, 0), (1, 3, 4, 2, 1), (0, 2, 1, 1, 0), (1, 1, 3, 2, 1)]:
    assert tuple(guide[b, i * ph + y, j * pw + x]) == (idx[b, i, j], y, x)
  np.testing.assert_array_equal(np.asarray(bk.to_patches(jnp.asarray(guide), (4, 5))), values[idx])


def test_grid_classes_majority_and_ties():
  lm = np.zeros((1, 4, 4), np.int32)
  lm[0, :2, :2] = [[3, 3], [3, 1]]     # cell (0,0): 3 wins 3:1
  lm[0, :2, 2:] = [[2, 2], [4, 4]]     # cell (0,1): tie 2 vs 4 -> lowest id 2
  lm[0, 2:, :2] = [[5, 6], [7, 7]]     # cell (1,0): 7 wins 2:1:1
  got = np.asarray(bk.grid_classes(lm, (2, 2), num_classes=8))
  np.testing.assert_array_equal(got, [[[3, 2], [7, 0]]])
  onehot = jax.nn.one_hot(lm, 8)
  np.testing.assert_array_equal(np.asarray(bk.grid_classes(onehot, (2, 2))), got)
  with pytest.raises(bk.BankError, match='multiple of the grid'):
    bk.grid_classes(lm, (3, 2), num_classes=8)


def _features(seed, nbatch=4, b=3, d=8, grid=(2, 4), patch=(2, 2), num_classes=4, fail_at=None):
  """Synthetic stand-in for the backbone: each value patch is filled with its key's first
  coordinate, so key/value pairing can be checked after FPS and reordering."""
  rng = np.random.default_rng(seed)
  batches = [(rng.normal(size=(b,) + grid + (d,)).astype(np.float32),
              rng.integers(0, num_classes, size=(b,) + grid)) for _ in range(nbatch)]

  def feature_fn(batch):
    i, (k, c) = batch
    if fail_at is not None and i == fail_at:
      raise RuntimeError('backbone crashed')
    vmap = np.repeat(np.repeat(k[..., :1], patch[0], 1), patch[1], 2)
    return k, np.repeat(vmap, 5, axis=-1), c
  return feature_fn, list(enumerate(batches)), batches


def test_build_save_load_roundtrip(tmp_path):
  feature_fn, inputs, batches = _features(0)
  m = bk.build(feature_fn, inputs, tmp_path / 'bank', max_per_class=100, num_classes=6,
               backbone_step=123, config_hash='abc', progress=False)
  bank = bk.load(tmp_path / 'bank', expect=dict(config_hash='abc', backbone_step=123, key_dim=8,
                                                value_shape=(2, 2, 5), grid=(2, 4), num_classes=6))
  all_k = np.concatenate([k.reshape(-1, 8) for k, _ in batches])
  all_c = np.concatenate([c.reshape(-1) for _, c in batches])
  assert m['count'] == len(all_k) == bank.keys.shape[0]       # no class over the cap: all kept
  assert m['class_sizes'] == {str(c): int((all_c == c).sum()) for c in range(6)}
  assert m['num_inputs'] == 12 and set(m['files']) >= {'keys.npy', 'faiss/0.index'}
  keys, vals, cls = map(np.asarray, (bank.keys, bank.values, bank.key_classes))
  assert (np.diff(cls) >= 0).all()                               # sorted by class
  for c in range(4):  # every class holds exactly its keys; FPS order within the class
    np.testing.assert_array_equal(keys[cls == c], all_k[all_c == c][fps_numpy(all_k[all_c == c], 100)])
  np.testing.assert_array_equal(vals, np.broadcast_to(keys[:, None, None, :1], vals.shape))
  # Retrieval from the loaded bank (FAISS indices read from files) == device == numpy.
  q = jnp.asarray(batches[0][0])
  qc = jnp.asarray(batches[0][1])
  g_dev = jax.jit(bk.retrieve, static_argnames='backend')(bank, q, qc, backend='device')
  g_fai = jax.jit(bk.retrieve, static_argnames='backend')(bank, q, qc, backend='faiss')
  np.testing.assert_array_equal(np.asarray(g_dev), np.asarray(g_fai))
  # The inputs' own keys are in the bank: each retrieves itself -> guide == its value map.
  want = np.repeat(np.repeat(batches[0][0][..., :1], 2, 1), 2, 2).repeat(5, -1)
  np.testing.assert_array_equal(np.asarray(g_dev), want)


def _stream_fps_numpy(keys, k, cap):
  pool = []
  for v in keys:
    if len(pool) == cap:
      pool = [pool[i] for i in fps_numpy(np.stack(pool), k)]
    pool.append(v)
  pool = np.stack(pool)
  return pool[fps_numpy(pool, k)]


def test_streaming_build_bounds_each_class(tmp_path):
  feature_fn, inputs, batches = _features(1, nbatch=6, b=4, num_classes=3)  # ~64 keys a class
  m = bk.build(feature_fn, inputs, tmp_path / 'bank', max_per_class=5, pool_factor=2,
               progress=False)
  bank = bk.load(tmp_path / 'bank')
  all_k = np.concatenate([k.reshape(-1, 8) for k, _ in batches])
  all_c = np.concatenate([c.reshape(-1) for _, c in batches])
  assert m['num_classes'] == 3 and m['count'] == 15
  assert m['class_sizes'] == {'0': 5, '1': 5, '2': 5}
  assert all(int(r) > 1 for r in m['fps_reductions'].values())   # really streamed
  keys, cls = np.asarray(bank.keys), np.asarray(bank.key_classes)
  for c in range(3):
    np.testing.assert_allclose(keys[cls == c], _stream_fps_numpy(all_k[all_c == c], 5, 10))


def test_load_errors_are_clear(tmp_path):
  feature_fn, inputs, _ = _features(2)
  path = tmp_path / 'bank'
  bk.build(feature_fn, inputs, path, max_per_class=100, backbone_step=10, config_hash='aaa',
           progress=False)
  with pytest.raises(bk.BankError, match=r"config_hash='aaa', backbone_step=10.*"
                     r"config_hash='bbb', backbone_step=20.*build_bank.py"):
    bk.load(path, expect=dict(config_hash='bbb', backbone_step=20, key_dim=8))
  with pytest.raises(bk.BankError, match='value_shape'):
    bk.load(path, expect=dict(value_shape=(4, 4, 512)))
  with pytest.raises(bk.BankError, match='no bank at'):
    bk.load(tmp_path / 'nowhere')
  # Corrupt one byte of the values: same size, sha256 fails.
  f = path / 'values.npy'
  raw = bytearray(f.read_bytes())
  raw[-3] ^= 0xFF
  f.write_bytes(bytes(raw))
  with pytest.raises(bk.BankError, match='values.npy fails its sha256'):
    bk.load(path)
  # Truncated keys file.
  f = path / 'keys.npy'
  f.write_bytes(f.read_bytes()[:-40])
  with pytest.raises(bk.BankError, match='keys.npy has .* bytes'):
    bk.load(path)
  (path / 'faiss' / '1.index').unlink()
  with pytest.raises(bk.BankError, match='missing file faiss/1.index'):
    bk.load(path)
  (path / 'manifest.json').write_text('{"files": ')
  with pytest.raises(bk.BankError, match='corrupt manifest'):
    bk.load(path)


def test_failed_build_keeps_previous_bank(tmp_path):
  path = tmp_path / 'bank'
  feature_fn, inputs, _ = _features(3)
  first = bk.build(feature_fn, inputs, path, max_per_class=100, config_hash='old', progress=False)
  bad_fn, bad_inputs, _ = _features(4, fail_at=2)
  with pytest.raises(RuntimeError, match='backbone crashed'):
    bk.build(bad_fn, bad_inputs, path, max_per_class=100, config_hash='new', progress=False)
  assert bk.load(path, expect=dict(config_hash='old')).manifest['files'] == first['files']
  assert os.listdir(tmp_path) == ['bank']                       # no temp dirs left behind
  # A successful rebuild replaces it.
  bk.build(*_features(5)[:2], path, max_per_class=100, config_hash='new', progress=False)
  assert json.loads((path / 'manifest.json').read_text())['config_hash'] == 'new'
  assert os.listdir(tmp_path) == ['bank']


def test_bad_inputs_raise_bank_error(tmp_path):
  rng = np.random.default_rng(6)
  bank, *_ = _random_bank(rng)
  with pytest.raises(bk.BankError, match='expected last dim 24'):
    bk.retrieve(bank, jnp.zeros((1, 2, 2, 16)), jnp.zeros((1, 2, 2), jnp.int32))
  with pytest.raises(bk.BankError, match='classes of shape'):
    bk.retrieve(bank, jnp.zeros((1, 2, 2, 24)), jnp.zeros((1, 2), jnp.int32))
  with pytest.raises(bk.BankError, match="backend='gpu'"):
    bk.retrieve(bank, jnp.zeros((1, 2, 2, 24)), jnp.zeros((1, 2, 2), jnp.int32), backend='gpu')
  feature_fn, inputs, _ = _features(7, num_classes=4)
  with pytest.raises(bk.BankError, match=r'class ids span \[0, 3\]: expected \[0, 2\)'):
    bk.build(feature_fn, inputs, tmp_path / 'b', max_per_class=10, num_classes=2, progress=False)
  assert not (tmp_path / 'b').exists()


def test_head_avatar_bank_without_classes(tmp_path):
  """Issue 7 layout: one key per frame (grid 1x1), the value is the whole frame, no classes."""
  rng = np.random.default_rng(8)
  frames = [rng.random((4, 6, 6, 3)).astype(np.float32) for _ in range(3)]
  codes = [rng.normal(size=(4, 1, 1, 7)).astype(np.float32) for _ in range(3)]
  m = bk.build(lambda i: (codes[i], frames[i], None), range(3), tmp_path / 'bank',
               max_per_class=100, progress=False)
  assert m['num_classes'] == 1 and m['grid'] == [1, 1] and m['value_shape'] == [6, 6, 3]
  bank = bk.load(tmp_path / 'bank', expect=dict(key_dim=7, num_classes=1))
  q = codes[1][2:3] + 1e-3
  got = bk.retrieve(bank, jnp.asarray(q), backend='device')
  np.testing.assert_array_equal(np.asarray(got)[0], frames[1][2])
  np.testing.assert_array_equal(np.asarray(bk.retrieve(bank, jnp.asarray(q), backend='faiss')),
                                np.asarray(got))


@pytest.mark.parametrize('read', [1, 3, 4, 7, 10])
def test_fixed_chunks_place_input_i_at_row_i_mod_size(read):
  """Whatever the read batch, input i is row i % size of a chunk of exactly `size` rows; the
  tail is padded with its last row and the real count is given (the bank's bits then do not
  depend on build_bank.py's --batch_size)."""
  n, size = 10, 4
  ids = np.arange(n)
  feats = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
  chunks = bk.FixedChunks(((ids[s:s + read], feats[s:s + read]) for s in range(0, n, read)),
                          size, num_inputs=n)
  got = list(chunks)
  assert len(chunks) == len(got) == 3
  assert [k for _, k in got] == [4, 4, 2]
  for j, ((i, f), k) in enumerate(got):
    assert i.shape == (size,) and f.shape == (size, 2)
    np.testing.assert_array_equal(i[:k], ids[j * size:j * size + k])
    np.testing.assert_array_equal(f[:k], feats[j * size:j * size + k])
  np.testing.assert_array_equal(got[-1][0][0][2:], [9, 9])   # padding repeats the last row
  with pytest.raises(bk.BankError, match='compute batch 0'):
    bk.FixedChunks([], 0)

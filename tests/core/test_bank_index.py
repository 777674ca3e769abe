"""Bank retrieval options: approximate indices (IVF both backends, HNSW FAISS) against exact
search, backend 'auto' resolution, the FAISS GPU selection rule, errors on bad names."""
import jax
import numpy as np
import pytest

from fiancee_jax import config as cfg
from fiancee_jax.core import bank as bk
from fiancee_jax.core.bank import index as ix

NEAREST = jax.jit(bk.nearest, static_argnames=('backend', 'query_tile'))


def _bank(rng, clustered, n=2400, d=32, nc=6, empty=4):
  """Keys around 60 centres (clustered) or i.i.d. normal; class `empty` has no keys."""
  centres = rng.normal(size=(60, d)) * 3
  if clustered:
    keys = centres[rng.integers(0, 60, n)] + rng.normal(size=(n, d))
    q = centres[rng.integers(0, 60, 300)] + rng.normal(size=(300, d))
  else:
    keys, q = rng.normal(size=(n, d)), rng.normal(size=(300, d))
  cls = rng.integers(0, nc, n)
  cls[cls == empty] = 0
  qc = rng.integers(0, nc, 300)
  qc[:6], qc[6:9] = empty, 99   # no keys / outside [0, nc): exact over all keys
  bank = bk.make_bank(keys.astype(np.float32), rng.normal(size=(n, 1, 1, 2)).astype(np.float32),
                      cls, nc)
  return bank, q.astype(np.float32), qc


def _exact(bank, q, qc):
  """float64 brute force of the same-class nearest key (all keys when the class has none)."""
  keys, kc = bank.host.keys.astype(np.float64), bank.host.key_classes
  d = ((q[:, None, :].astype(np.float64) - keys[None]) ** 2).sum(-1)
  own = kc[None, :] == qc[:, None]
  d = np.where(own | ~own.any(1, keepdims=True), d, np.inf)
  return d.argmin(1)


@pytest.mark.parametrize('backend', ['device', 'faiss'])
def test_ivf_probing_every_list_is_exact_and_few_lists_keep_recall(backend):
  rng = np.random.default_rng(0)
  bank, q, qc = _bank(rng, clustered=False)
  want = _exact(bank, q, qc)
  full = bk.with_index(bank, bk.IndexSpec('ivf', nlist=16, nprobe=16))
  np.testing.assert_array_equal(np.asarray(NEAREST(full, q, qc, backend=backend)), want)
  few = bk.with_index(bank, bk.IndexSpec('ivf', nlist=16, nprobe=1))
  got = np.asarray(NEAREST(few, q, qc, backend=backend))
  assert (got == want).mean() < 0.9          # on structureless keys 1 of 16 lists misses
  np.testing.assert_array_equal(got[:9], want[:9])   # the fallback queries stay exact
  # clustered keys (what features are): 2 of 16 lists per query find the exact neighbour
  bank, q, qc = _bank(np.random.default_rng(1), clustered=True)
  want = _exact(bank, q, qc)
  two = bk.with_index(bank, bk.IndexSpec('ivf', nlist=16, nprobe=2))
  assert (np.asarray(NEAREST(two, q, qc, backend=backend)) == want).mean() >= 0.9


def test_ivf_backends_agree_and_hnsw_recall():
  bank, q, qc = _bank(np.random.default_rng(2), clustered=False)
  ivf = bk.with_index(bank, bk.IndexSpec('ivf', nlist=16, nprobe=4))
  dev = np.asarray(NEAREST(ivf, q, qc, backend='device'))
  fs = np.asarray(NEAREST(ivf, q, qc, backend='faiss'))
  assert (dev == fs).mean() >= 0.99          # the same lists, the same probes
  # each query's answer lies in one of its class's lists: never another class's key
  kc = ivf.host.key_classes
  own = np.isin(qc, kc)
  assert own.sum() > 200 and (kc[dev[own]] == qc[own]).all()
  hnsw = bk.with_index(bank, bk.IndexSpec('hnsw', hnsw_m=16, ef_search=64))
  assert (np.asarray(NEAREST(hnsw, q, qc, backend='faiss')) == _exact(bank, q, qc)).mean() >= 0.9
  np.asarray(NEAREST(hnsw, q, qc, backend='auto'))
  assert hnsw.host.backend_used == 'faiss'   # HNSW only exists in FAISS
  with pytest.raises(bk.BankError, match='no device search'):
    NEAREST(hnsw, q, qc, backend='device')


def test_auto_backend_resolution():
  assert bk.resolve_backend('auto', 'cpu', faiss_ok=True) == 'faiss'
  assert bk.resolve_backend('auto', 'cpu', faiss_ok=False) == 'device'
  assert bk.resolve_backend('auto', 'gpu', faiss_ok=True) == 'device'
  assert bk.resolve_backend('auto', 'tpu', faiss_ok=True) == 'device'
  assert bk.resolve_backend('auto', 'gpu', index='hnsw', faiss_ok=True) == 'faiss'
  for b in ('device', 'faiss'):
    assert bk.resolve_backend(b, 'tpu') == b   # explicit choices are kept
  # on this (CPU) machine the default resolves to FAISS and says so on the bank
  bank, q, qc = _bank(np.random.default_rng(3), clustered=False, n=300)
  want = _exact(bank, q, qc)
  np.testing.assert_array_equal(np.asarray(jax.jit(bk.nearest)(bank, q, qc)), want)
  assert bank.host.backend_used == bk.resolve_backend('auto')
  assert bank.host.backend_used == ('faiss' if jax.default_backend() == 'cpu' else 'device')
  # a thread count for the FAISS search: same neighbours, FAISS's global setting restored
  import faiss
  before = faiss.omp_get_max_threads()
  one = bk.with_index(bank, bk.IndexSpec('flat', faiss_threads=1))
  np.testing.assert_array_equal(np.asarray(NEAREST(one, q, qc, backend='faiss')), want)
  assert faiss.omp_get_max_threads() == before


def test_faiss_gpu_only_with_gpus_on_a_gpu_platform():
  assert ix.faiss_gpu_wanted('gpu', 1) and ix.faiss_gpu_wanted('cuda', 2)
  assert not ix.faiss_gpu_wanted('gpu', 0)
  assert not ix.faiss_gpu_wanted('cpu', 4) and not ix.faiss_gpu_wanted('tpu', 4)
  import faiss
  bank, q, qc = _bank(np.random.default_rng(4), clustered=False, n=300)
  NEAREST(bank, q, qc, backend='faiss')
  gpu = ix.faiss_gpu_wanted(jax.default_backend(), ix.faiss_gpu_count(faiss))
  assert bank.host.faiss_on_gpu == gpu
  kinds = {type(i).__name__ for i, _ in bank.host.faiss_indices().values()}
  assert kinds == ({'GpuIndexFlatL2'} if gpu else {'IndexFlatL2'})


def test_bad_names_fail_clearly():
  bank, q, qc = _bank(np.random.default_rng(5), clustered=False, n=100)
  with pytest.raises(bk.BankError, match=r"backend='gpu'.*'auto', 'device', 'faiss'"):
    bk.nearest(bank, q, qc, backend='gpu')
  with pytest.raises(bk.BankError, match=r"index='lsh'.*'flat', 'ivf', 'hnsw'"):
    bk.IndexSpec('lsh')
  with pytest.raises(bk.BankError, match='nprobe=0'):
    bk.IndexSpec('ivf', nprobe=0)
  with pytest.raises(bk.BankError, match='faiss_threads=-1'):
    bk.IndexSpec(faiss_threads=-1)
  assert [ix.lists_for(n, 64) for n in (10, 191, 2496, 5000)] == [1, 4, 64, 64]
  c = cfg.load('configs/oasis_synthetic.py')
  assert c.bank.backend == 'auto' and bk.IndexSpec.from_config(c.bank).kind == 'flat'
  with c.unlocked():
    c.bank.index, c.bank.backend = 'annoy', 'cuda'
  with pytest.raises(cfg.ConfigError, match=r"bank.index='annoy'[\s\S]*bank.backend='cuda'|"
                                            r"bank.backend='cuda'[\s\S]*bank.index='annoy'"):
    cfg.validate(c)

"""Guiding bank (Sec. 3.3, 4.1, S1.1.1): build, farthest-point sampling, save/load, retrieval.

A bank is a set of key-value pairs. OASIS: keys are the 1024-d feature vectors of the 8x16
map after the first conv + ResBlock 1 (one key per grid position), tagged with the semantic
class that dominates that position's block of the label map; values are the (4, 4, 512)
patches (NHWC) of the map after ResBlock 3 on the same grid. Head avatars (Sec. 4.2): one key
per frame (3 angles + 512-d expression, grid 1x1), the value is the frame, no classes
(`classes=None` = one class); one bank per source identity, and `stack` merges several into
one bank whose class i is identity i (backbones/megaportraits/frame_banks.py). At inference each query
position fetches the value of its nearest key of the same class (L2) and the patches are
glued back into a guide feature map.

Building streams (keys, value map, classes) batches from a caller's `feature_fn` and keeps,
per class, a bounded candidate pool on disk (np.memmap, keys and values). When a pool fills
up (`pool_factor * max_per_class` rows) it is reduced to `max_per_class` rows by exact
farthest-point sampling (FPS); the end result is FPS of each class's last pool. This is
exact global FPS whenever a class has at most `pool_factor * max_per_class` keys in all, and
otherwise a streaming approximation of it (FPS over the previous selection + the new chunk).
Its cost is ~ max_per_class * keys_seen * D * pool_factor / (pool_factor - 1) — the same order
as exact global FPS, without holding all keys (paper: 6.4M x 1024) at once.

FPS starts from the first key of the class in stream order (pool index 0, which every
reduction keeps at index 0), picks argmax of the min-distance (ties: lowest index), never
picks a point twice.

Two retrieval backends give the same neighbours (exact L2): 'device' (queries sorted by
class, each tile scored by matmul + masked argmin against its class's key segment only;
jittable anywhere) and 'faiss' (one `faiss.IndexFlatL2` per class
on the host, called from jit through `jax.pure_callback`; on a GPU index with faiss-gpu on a
GPU platform). 'auto' (the default) resolves to the faster one per platform (index.py).
`with_index(bank, IndexSpec('ivf' | 'hnsw'))` makes the search approximate (index.py). A query whose class has no keys
in the bank (or an id outside [0, num_classes)) searches all keys instead: inference never
fails on a rare class.

Files under `<workdir>/bank/`: keys.npy (N, D) f32, values.npy (N, ph, pw, C) f32,
classes.npy (N,) i32 (sorted by class, FPS order inside a class), faiss/<class>.index,
manifest.json (format, backbone step, config hash, shapes, counts, per-class sizes, sha256
of every file). Written into a temp dir next to the target and swapped in by rename: an
existing bank is kept until the new one is complete.
"""
from __future__ import annotations

from fiancee_jax.core.bank.fps import fps
from fiancee_jax.core.bank.layout import BankError, glue, grid_classes, to_patches
from fiancee_jax.core.bank.index import BACKENDS, INDEX_KINDS, IndexSpec, resolve_backend
from fiancee_jax.core.bank.retrieve import (Bank, BankHost, make_bank, nearest, retrieve, stack,
                                            with_index)
from fiancee_jax.core.bank.store import EXPECT_FIELDS, FORMAT_VERSION, FixedChunks, build, load

__all__ = ['BACKENDS', 'EXPECT_FIELDS', 'FORMAT_VERSION', 'INDEX_KINDS', 'Bank', 'BankError',
           'BankHost', 'FixedChunks', 'IndexSpec', 'build', 'fps', 'glue', 'grid_classes', 'load',
           'make_bank', 'nearest', 'resolve_backend', 'retrieve', 'stack', 'to_patches',
           'with_index']

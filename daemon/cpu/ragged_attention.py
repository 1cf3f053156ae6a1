"""Attention of a few query rows in one C call per block, on a CPU (`ragged_attention.c`): every
sequence of a batch's forward at once, or one sequence's decode step or short verification.

MLX runs a sequence's attention as ~8 ops a block (the cache's slices, two products, the mask, the
softmax), each a graph node and a task on MLX's scheduler, for a few query rows against a few
hundred keys, and a batch's forward (daemon.engine.ragged) runs them per sequence. On the 2-vCPU
AMD EPYC, 8 sequences of one row each after ~250 tokens took 76.6 ms that way and 67.4 ms this
way (~52 ms with attention left out), of two rows each 119.3 against 89.4 ms. Here the block
writes the step's keys and values into the caches as before (mlx-lm's KVCache), evaluates them,
and one C call reads the caches' buffers in place and computes every sequence's rows. It sums in
another order than MLX's (~1e-6 relative; daemon.engine.ties keeps greedy output independent of
that). A batch's forward takes it when each sequence brings at most MAX_ROWS rows (a prefill
chunk's attention is a large product, BLAS's work), a sequence's own forward up to ALONE_ROWS.
Kept only where the start-up probe (daemon.cpu.forms) times it MARGIN faster than MLX's on a
batch's step.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import mlx.core as mx
import numpy as np

from daemon.cpu import alternating, native_build

SOURCE = "ragged_attention.c"
FLAGS = "-O3 -shared -fPIC"
MAX_ROWS = 16
# a sequence's forward by itself takes it up to this many rows: after 300 tokens on the 2-vCPU AMD
# EPYC its 1 / 2 / 3-row forwards took 34.2 / 33.3 / 38.7 ms against MLX's 35.2 / 38.2 / 43.7, 9 rows
# 83.4 against 75.4 (MLX's products of many rows amortise its ops); since the few-row products
# fetch ahead, 5 / 6 rows 38.2-39.7 / 41.7-45.4 against 40.6-42.0 / 42.8-45.8, 8 rows 57.1 against 52.9
ALONE_ROWS = 6
PROBE = (8, 2, 256)  # sequences, rows each, keys: a verification of one draft at 8 clients
LAYERS = 30
MARGIN = 0.10

_function = None


def load(folder: Path) -> bool:
    """Builds (once per source, in `folder`) and loads the kernel; False where it cannot be built."""
    global _function
    if _function is None:
        path = native_build.library(folder, SOURCE, FLAGS, "ragged-attention")
        if path is None:
            return False
        f = ctypes.CDLL(path).mtpd_ragged_attention
        f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float] + [ctypes.c_int] * 4 + [ctypes.c_void_p] * 6
        f.restype = ctypes.c_int
        _function = f
    return True


HEAD_DIMS = (16, 32, 64, 128)  # the row widths the kernel computes (a constant count of 16-float vectors)


def fits(bounds, head_dim: int) -> bool:
    return _function is not None and head_dim in HEAD_DIMS and all(e - s <= MAX_ROWS for s, e in bounds)


def attention(queries: mx.array, caches: list, bounds, scale: float = 1.0) -> mx.array:
    """queries [1, H, N, D] of the sequences laid end to end (`bounds`), whose rows the caches
    (mlx-lm KVCaches, batch 1) already hold; each score times `scale`. Returns [1, H, N, D]."""
    mx.eval(queries, [(c.keys, c.values) for c in caches])
    q = np.ascontiguousarray(np.asarray(queries)[0].transpose(1, 0, 2))  # [N, H, D]: a view where it can be
    out = np.empty_like(q)
    buffers = [(np.ascontiguousarray(np.asarray(c.keys)), np.ascontiguousarray(np.asarray(c.values))) for c in caches]
    n = len(caches)
    ints = ctypes.c_int * n
    pointers = ctypes.c_void_p * n
    G = buffers[0][0].shape[1]
    failed = _function(q.ctypes.data, out.ctypes.data, scale, q.shape[1], G, q.shape[2], n,
                       ints(*(s for s, _ in bounds)), ints(*(e - s for s, e in bounds)), ints(*(c.offset for c in caches)),
                       ints(*(k.shape[2] for k, _ in buffers)), pointers(*(k.ctypes.data for k, _ in buffers)),
                       pointers(*(v.ctypes.data for _, v in buffers)))
    if failed:
        raise MemoryError("ragged attention: no memory for the scores")
    return mx.array(out)[None].transpose(0, 2, 1, 3)


def probe(heads: int, kv_heads: int, head_dim: int, attend) -> tuple[bool, dict[str, float]]:
    """Times LAYERS attentions of a batch's step (PROBE: sequences, rows each, keys) both ways,
    the rows written into the caches and the outputs evaluated as a block does (MLX's per sequence,
    `attend(q, k, v, scale)`, then this one; daemon.cpu.alternating): (whether this one is MARGIN
    faster, ms each way). False where the kernel cannot be built or loaded."""
    from mlx_lm.models.cache import KVCache

    from daemon.cpu.blas import native_folder

    try:
        built = load(native_folder())
    except OSError:  # an unwritable cache, a library that cannot load
        built = False
    sequences, rows, keys = PROBE
    bounds = [(i * rows, (i + 1) * rows) for i in range(sequences)]
    if not built or not fits(bounds, head_dim):
        return False, {}
    caches = []
    for i in range(sequences):
        cache = KVCache()
        cache.update_and_fetch(*(mx.random.normal((1, kv_heads, keys, head_dim), key=mx.random.key(2 * i + j)) for j in (0, 1)))
        caches.append(cache)
    q = mx.random.normal((1, heads, sequences * rows, head_dim), key=mx.random.key(1000)) * head_dim ** -0.5
    k, v = (mx.random.normal((1, kv_heads, sequences * rows, head_dim), key=mx.random.key(1001 + i)) for i in (0, 1))
    mx.eval(q, k, v, [(c.keys, c.values) for c in caches])

    def step(native: bool) -> None:
        for _ in range(LAYERS):
            outs = []
            for (s, e), cache in zip(bounds, caches):
                kk, vv = cache.update_and_fetch(k[:, :, s:e], v[:, :, s:e])
                if not native:
                    outs.append(attend(q[:, :, s:e], kk, vv, 1.0))
            mx.eval(attention(q, caches, bounds) if native else mx.concatenate(outs, axis=2))
            for cache in caches:
                cache.trim(rows)

    best = alternating.fastest(("mlx", lambda: step(False)), ("native", lambda: step(True)))
    return best["native"] < (1 - MARGIN) * best["mlx"], {name: round(t * 1000, 3) for name, t in best.items()}

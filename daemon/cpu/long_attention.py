"""Attention over long contexts on a CPU, in NumPy: a prompt's chunks, and the few rows of a decode
step or a verification, against thousands of keys.

MLX's CPU backend runs the softmax's elementwise ops one scalar at a time (measured on a 2-vCPU
AMD EPYC: ~29 ns per `exp` against NumPy's ~3.6 ns, which vectorises), and a 512-row prefill chunk
against 5,400 keys spends most of a layer there (MLX 567 ms, NumPy ~150 ms); a 5-row verification
against 4,000 keys takes 2.9 ms a layer in MLX and 0.8 ms this way. So score matrices of at least
`LONG_SCORES` elements take this path (a 1-row step from ~1,800 keys for the default model's 9
heads, a 5-row verification from ~360): MLX computes the scores of ROWS query rows at a
time, NumPy's vectorised `exp` turns them into probabilities in place, and MLX multiplies them by
the values. Measured on the default model's prefill on that machine (bench/prefill.py): see
docs/cpu.md. The sums run in another order than MLX's, so outputs differ by float rounding (~1e-6);
every policy prefills the same way, so greedy answers stay identical across policies. Whether it
is faster on this machine is measured at load (`probe`, daemon.cpu.forms), never assumed.
"""

from __future__ import annotations

import functools
import time

import mlx.core as mx
import numpy as np

LONG_SCORES = 1 << 14  # query rows x keys x heads from which a block takes this path
ROWS = 256  # query rows per NumPy block: bounds the scores held at once
# (query rows, keys, repeats): a prefill chunk late in a long prompt; a verification of 4 drafts there
PROBE_SHAPES = ((256, 2048, 1), (5, 2048, 20))
MARGIN = 0.10  # kept only if this much faster than MLX's own


def long_enough(rows: int, keys: int, heads: int) -> bool:
    return rows * keys * heads >= LONG_SCORES


@functools.lru_cache(maxsize=8)
def _future(rows: int, width: int) -> np.ndarray:
    """[rows, width] additive mask over the last `width` keys: row i sees the first i of them."""
    return np.where(np.triu(np.ones((rows, width), dtype=bool)), -np.inf, 0.0).astype(np.float32)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Causal attention of the last L positions, as daemon.cpu.fast_block.grouped_attention:
    q [B, H, L, D]; k, v [B, G, S, D] with H a multiple of G. Returns [B, H, L, D]. The products
    stay MLX's (its BLAS: a second thread pool beside it would cost more than it saves); the
    softmax of each ROWS-row block of scores runs in NumPy, in place in the scores' buffer, which
    nothing else holds."""
    B, H, L, D = q.shape
    G, S = k.shape[1], k.shape[2]
    R = H // G
    grouped = (q * scale if scale != 1.0 else q).reshape(B, G, R, L, D)
    keys = k.swapaxes(-1, -2)
    outs = []
    for r0 in range(0, L, ROWS):
        n = min(ROWS, L - r0)
        scores = grouped[:, :, :, r0 : r0 + n].reshape(B, G, R * n, D) @ keys
        mx.eval(scores)
        s = np.asarray(scores).reshape(B, G, R, n, S)
        first = S - L + r0  # the position of the block's first row: it sees keys up to it
        if first + 1 < S:
            s[..., first + 1 :] += _future(n, S - first - 1)
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        outs.append((scores @ v).reshape(B, G, R, n, D))  # `scores` now holds the probabilities
    out = mx.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    return out.reshape(B, H, L, D)


def probe(heads: int, kv_heads: int, head_dim: int) -> tuple[bool, dict[str, float]]:
    """Times attention both ways (MLX's as the plain block runs it, then this one; A B B A) at each
    of PROBE_SHAPES; (whether this one is MARGIN faster at each, the ms of each: `mlx` and `numpy`
    for the prefill chunk, `mlx_few` and `numpy_few` for the verification)."""
    faster, ms = True, {}
    for shape, suffix in zip(PROBE_SHAPES, ("", "_few")):
        times = _both_ways(heads, kv_heads, head_dim, *shape)
        ms |= {name + suffix: round(sum(t) / len(t) / shape[2] * 1000, 2) for name, t in times.items()}
        faster = faster and sum(times["numpy"]) < (1 - MARGIN) * sum(times["mlx"])
    return faster, ms


def _both_ways(heads: int, kv_heads: int, head_dim: int, rows: int, keys: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of `repeats` attentions of rows x keys by MLX and by NumPy, twice each (A B B A)."""
    q = mx.random.normal((1, heads, rows, head_dim), key=mx.random.key(0))
    k, v = (mx.random.normal((1, kv_heads, keys, head_dim), key=mx.random.key(i)) for i in (1, 2))
    mx.eval(q, k, v)
    scale = head_dim ** -0.5

    def by_mlx():
        for _ in range(repeats):
            mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal"))

    def by_numpy():
        for _ in range(repeats):
            mx.eval(attention(q, k, v, scale))

    by_mlx(), by_numpy()  # warm: first touches, the mask
    times = {"mlx": [], "numpy": []}
    for name, run in (("mlx", by_mlx), ("numpy", by_numpy), ("numpy", by_numpy), ("mlx", by_mlx)):
        start = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - start)
    return times

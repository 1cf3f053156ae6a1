"""Attention's softmax with its `exp` in a kernel MLX compiles, on a CPU.

MLX's own softmax runs the scalar `exp` of its prebuilt CPU library; a compiled graph's `exp` is
built at run time, for this CPU where mtpd's re-execution arranged it (daemon.cpu.native_jit). On
the 2-vCPU AMD EPYC, the 30 blocks' attention weights of a 5-row verification after 300 tokens took
5.2 ms in MLX's softmax and 2.3 ms this way, and the whole 5-row forward 49.2 -> 45.0 ms; built for
a generic x86-64 this way is slower than MLX's, and under ROWS rows its extra ops cost more than
its `exp` saves. It sums in another order (~1e-7 relative; daemon.engine.ties keeps
greedy output independent of that). From ROWS rows on, kept only where the start-up probe
(daemon.cpu.forms) times it MARGIN faster at both of PROBE_ROWS.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from daemon.cpu import alternating

ROWS = 4  # fewer rows take MLX's: its one op costs less than this one's four (a one-row forward 30.1 -> 31.4 ms)
PROBE_ROWS = (4, 8)  # verifications of three and seven drafts
PROBE_KEYS = 320
LAYERS = 30  # calls per timing: a forward's worth
MARGIN = 0.10


@functools.partial(mx.compile, shapeless=True)
def _shifted_exp(x: mx.array, top: mx.array) -> mx.array:
    return mx.exp(x - top)


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis (fp32), its exp in a compiled kernel."""
    e = _shifted_exp(x, x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def mlx_softmax(x: mx.array) -> mx.array:
    return mx.softmax(x, axis=-1, precise=True)


def probe(n_heads: int, n_kv_heads: int) -> tuple[bool, dict[str, float]]:
    """Times LAYERS attention softmaxes of PROBE_ROWS rows against PROBE_KEYS keys both ways
    (daemon.cpu.alternating): (whether this one is MARGIN faster at each, ms each way)."""
    faster, ms = True, {}
    for rows in PROBE_ROWS:
        scores = [mx.random.normal((1, n_kv_heads, n_heads // n_kv_heads * rows, PROBE_KEYS), key=mx.random.key(i))
                  for i in range(LAYERS)]
        mx.eval(scores)
        best = alternating.fastest(("mlx", lambda batch=scores: mx.eval([mlx_softmax(s) for s in batch])),
                                   ("compiled", lambda batch=scores: mx.eval([softmax(s) for s in batch])))
        ms |= {f"{name}_{rows}": round(t * 1000, 3) for name, t in best.items()}
        faster = faster and best["compiled"] < (1 - MARGIN) * best["mlx"]
    return faster, ms

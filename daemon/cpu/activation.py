"""The MLP's activation (SwiGLU: silu(gate) * up) in NumPy, for inputs of many rows on a CPU.

MLX's CPU backend computes `exp` one scalar at a time (daemon.cpu.long_attention), and the
activation of a block's 1,536-wide MLP is an `exp` per element: on a 2-vCPU AMD EPYC, 16 rows took
~390 us in MLX against ~37 us in NumPy, 48 rows ~1.5 ms against ~76 us, so a 512-row prefill chunk
spends ~15 ms a layer on it. From ROWS rows on (a batch's forward, a prefill chunk) the block
evaluates its gate and up projections, NumPy's vectorised `exp` computes the activation, and MLX
multiplies it by the down projection. It rounds differently from MLX's (~1e-7 relative); every
policy's forwards of as many rows go the same way. Kept only where the start-up probe
(daemon.cpu.forms) times it faster.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from daemon.cpu import alternating

ROWS = 8  # fewer rows: the extra evaluation costs about what it saves
PROBE_ROWS = (16, 256)  # a batch's forward; a prefill chunk
MARGIN = 0.10


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, computed in NumPy after evaluating both."""
    mx.eval(gate, up)
    g, u = np.asarray(gate), np.asarray(up)
    out = np.negative(g)
    np.exp(out, out=out)
    out += 1.0
    np.divide(g, out, out=out)
    out *= u
    return mx.array(out)


def probe(width: int) -> tuple[bool, dict[str, float]]:
    """Times the activation of PROBE_ROWS rows of `width` both ways (MLX's compiled, as a block
    runs it; then this one; daemon.cpu.alternating): (whether this one is MARGIN faster at each, ms
    each way)."""
    from mlx_lm.models.activations import swiglu as mlx_swiglu

    compiled = mx.compile(mlx_swiglu)
    faster, ms = True, {}
    for rows in PROBE_ROWS:
        gate, up = (mx.random.normal((1, rows, width), key=mx.random.key(i)) for i in (0, 1))
        mx.eval(gate, up)
        best = alternating.fastest(("mlx", lambda g=gate, u=up: [mx.eval(compiled(g, u)) for _ in range(10)]),
                                   ("numpy", lambda g=gate, u=up: [mx.eval(swiglu(g, u)) for _ in range(10)]))
        ms |= {f"{name}_{rows}": round(t / 10 * 1000, 3) for name, t in best.items()}
        faster = faster and best["numpy"] < (1 - MARGIN) * best["mlx"]
    return faster, ms

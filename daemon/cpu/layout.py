"""Weight layouts for fast fp32 matrix products on a CPU."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map


def column_major(module: nn.Module) -> None:
    """Stores every fp32 matrix column-major, as the transposed view of a contiguous [in, out]
    buffer: same shapes, same values, same memory. A layer computes x @ W.T, which then reaches
    BLAS as a plain (non-transposed) product; OpenBLAS runs that ~1.2-2x faster for the few rows of
    a decode or verification step, with bit-identical results (timings: docs/cpu.md). Under Intel
    MKL it is faster from 4 rows on and slower for 2-3, where row-major copies (daemon.cpu.row_major)
    serve instead; it stays on for every BLAS."""
    module.update(tree_map(lambda w: column_major_matrix(w) if w.ndim == 2 and w.dtype == mx.float32 else w, module.parameters()))
    mx.eval(module.parameters())


def column_major_matrix(w: mx.array) -> mx.array:
    """[out, in] with the same values, stored as the transposed view of a contiguous [in, out]."""
    return mx.contiguous(w.T).T



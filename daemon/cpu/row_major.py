"""Row-major copies of the weights for inputs of a few rows, under Intel MKL (CPU, fp32).

The column-major layout (daemon.cpu.layout) suits OpenBLAS at every row count and MKL at one row
or at four and more; for 2-3 rows MKL streams a row-major matrix nearly as fast as for one row. A
decode step (1 row) and the commonest verifications (2-3 rows) dominate decoding, so under MKL the
blocks (daemon.cpu.fast_block.FastBlock.add_row_major) and the LM head get a second, row-major copy
used for inputs of up to FEW_ROWS rows (timings: docs/cpu.md). The copies double the memory of the
weights, so they are made only where they take at most an eighth of the machine's
memory. They are a snapshot: a weight update after `install` reaches only longer inputs.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from daemon.cpu.fast_block import FEW_ROWS, FastBlock

MEMORY_SHARE = 8  # the copies may take at most 1/8 of physical memory


class RowMajorEmbedding(nn.Embedding):
    """A tied embedding whose use as the LM head reads a row-major copy for few rows."""

    def as_linear(self, x: mx.array) -> mx.array:
        if x.shape[-2] <= FEW_ROWS:
            return x @ self._row_major.T
        return super().as_linear(x)


class RowMajorLinear(nn.Linear):
    """An LM head (no bias) that reads a row-major copy for few rows."""

    def __call__(self, x: mx.array) -> mx.array:
        if x.shape[-2] <= FEW_ROWS:
            return x @ self._row_major.T
        return super().__call__(x)


def worth_it(module: nn.Module) -> bool:
    """Under MKL, for fp32 weights taking at most 1/MEMORY_SHARE of physical memory."""
    from daemon.cpu.blas import blas_in_use

    if not blas_in_use().startswith("Intel MKL"):
        return False
    weights = [w for _, w in tree_flatten(module.parameters())]
    size = sum(w.nbytes for w in weights)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return all(w.dtype == mx.float32 for w in weights) and size * MEMORY_SHARE <= memory


def install(blocks: list, head: nn.Module | None = None) -> int:
    """Row-major copies for the FastBlocks among `blocks` and for `head` (a tied embedding or a
    bias-free Linear). Returns the number of blocks given copies."""
    done = sum(block.add_row_major() for block in blocks if isinstance(block, FastBlock))
    swap = {nn.Embedding: RowMajorEmbedding, nn.Linear: RowMajorLinear}.get(type(head))
    if swap is not None and "bias" not in head:
        head.__class__ = swap
        object.__setattr__(head, "_row_major", mx.contiguous(head.weight))
        mx.eval(head._row_major)
    return done


def copies(blocks: list) -> int:
    """How many of `blocks` have row-major copies."""
    return sum(getattr(block, "_row_major", None) is not None for block in blocks)

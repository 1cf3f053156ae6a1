"""The daemon's memory, bounded and counted.

MLX keeps freed buffers in a cache for reuse. On Metal that cache may grow to the whole memory limit
by default, and buffers of ever new shapes (prompts of every length) pile up there; the CPU build
caps it at 32 MiB. The engine sets the cap (`mlx_cache_bytes`, default CACHE_BYTES on a GPU, MLX's
own on the CPU), empties the cache every CLEAR_EVERY steps as mlx-lm does, and when it falls idle,
where it also hands the C heap's free pages back (glibc's malloc_trim), so an idle daemon holds what
it uses. `Memory` is what /health and the metrics show, taken on the engine thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from dataclasses import dataclass

import mlx.core as mx
import psutil

CACHE_BYTES = 1 << 30  # on a GPU: enough to reuse a step's buffers, far from the model's own size
CLEAR_EVERY = 256  # engine steps between cache clears (mlx-lm: every 256 tokens)


@dataclass(frozen=True)
class Memory:
    """Bytes: MLX's arrays in use, its buffer cache and peak, and the prompt cache's arrays (part of active)."""

    mlx_active_bytes: int = 0
    mlx_cache_bytes: int = 0
    mlx_peak_bytes: int = 0
    prompt_cache_bytes: int = 0

    @classmethod
    def now(cls, prompt_cache_bytes: int = 0) -> Memory:
        return cls(mx.get_active_memory(), mx.get_cache_memory(), mx.get_peak_memory(), prompt_cache_bytes)


def resident_bytes() -> int:
    """The process's resident set (RSS), on macOS and Linux."""
    return psutil.Process().memory_info().rss


def limit_cache(setting: int | None, gpu: bool) -> int:
    """Sets MLX's buffer cache limit: `setting`, else CACHE_BYTES on a GPU and MLX's own cap on the CPU.
    Returns the limit in force."""
    if setting is None and not gpu:
        limit = mx.set_cache_limit(0)  # reads MLX's own cap
    else:
        limit = CACHE_BYTES if setting is None else setting
    mx.set_cache_limit(limit)
    return limit


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return getattr(libc, "malloc_trim", None)  # glibc only (not musl)


def release() -> None:
    """Empties MLX's buffer cache and gives the C heap's free pages back to the system."""
    mx.clear_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

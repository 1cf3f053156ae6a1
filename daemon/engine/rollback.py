"""Taking back the positions a verification rejected, for attention and recurrent layers alike.

Attention caches (KVCache and kin) trim: they drop their last positions. A recurrent layer (mlx-lm's
ArraysCache: Gated DeltaNet in Qwen3.5/3.6/Next, Mamba in Nemotron-H, LFM2's convolutions) keeps
one state that has already absorbed every verified row, so it is kept aside before the forward
(MLX arrays are immutable: keeping costs references, not copies) and put back after it; the
positions to keep are then run through the model again (snapshot and replay). The replay costs a
forward over the kept rows, only in rounds that rejected a draft and only on hybrid models.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, RotatingKVCache, trim_prompt_cache


def speculable(cache: list) -> bool:
    """Whether every layer's cache can take positions back: trimmable attention (a sliding
    window that wraps cannot) or a recurrent state."""
    return all(isinstance(c, ArraysCache) or (c.is_trimmable() and not isinstance(c, RotatingKVCache)) for c in cache)


def keep_states(cache: list) -> list | None:
    """The recurrent states before a forward that may be partly taken back; None for a model
    without recurrent layers (trimming is enough)."""
    if not any(isinstance(c, ArraysCache) for c in cache):
        return None
    return [list(c.cache) if isinstance(c, ArraysCache) else None for c in cache]


def take_back(model, cache: list, states: list | None, fed: list[int], keep: int) -> None:
    """`fed` token ids went through the model since `states` were kept; afterwards the cache holds
    only the first `keep` of them."""
    if keep == len(fed):
        return
    if states is None:
        trim_prompt_cache(cache, len(fed) - keep)
        return
    for c, state in zip(cache, states):
        if state is None:
            c.trim(len(fed))
        else:
            c.cache = list(state)
    if keep:
        model(mx.array([fed[:keep]]), cache=cache)
        mx.eval([c.state for c in cache])

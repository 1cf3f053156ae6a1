"""Taking back the positions a verification rejected, for attention and recurrent layers alike.

Attention caches (KVCache and kin) trim: they drop their last positions. A recurrent layer (mlx-lm's
ArraysCache: Gated DeltaNet in Qwen3.5/3.6/Next, Mamba in Nemotron-H, LFM2's convolutions) keeps
one state that has already absorbed every verified row, and a sliding window that has wrapped
(RotatingKVCache: Gemma 3, Step-3.5) or DeepSeek V4's layer cache (a window, compressed groups and
the rows of the open group) has already dropped rows it cannot get back; such a cache is kept aside
before the forward (MLX arrays are immutable, and these caches replace their arrays rather than
write into them when several rows come at once, as a verification's do: keeping costs references,
not copies) and put back after it; the positions to keep are then run through the model again
(snapshot and replay). The replay costs a forward over the kept rows, only in rounds that rejected
a draft and only on models with such caches (docs/models.md measures it against keeping every
position's state).
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, RotatingKVCache, trim_prompt_cache
from mlx_lm.models.deepseek_v41 import LayerCache

REBINDING = (LayerCache, RotatingKVCache)  # their updates of several rows assign new arrays, never write into them


def _restorable(c) -> bool:
    return isinstance(c, (ArraysCache, *REBINDING))


def speculable(cache: list) -> bool:
    """Whether every layer's cache can take positions back: trimmable attention, or a cache kept
    aside and put back."""
    return all(_restorable(c) or c.is_trimmable() for c in cache)


def keep_states(cache: list) -> list | None:
    """What the caches that cannot trim hold before a forward of several rows that may be partly
    taken back (None per layer that trims); None when every layer trims."""
    if not any(_restorable(c) for c in cache):
        return None
    return [(list(c.cache) if isinstance(c, ArraysCache) else dict(vars(c))) if _restorable(c) else None for c in cache]


def restore(cache: list, states: list) -> None:
    """Puts back what `keep_states` kept (layers that trim are left to the caller)."""
    for c, state in zip(cache, states):
        if isinstance(c, ArraysCache):
            c.cache = list(state)
        elif state is not None:
            vars(c).update(state)


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
    restore(cache, states)
    if keep:
        model(mx.array([fed[:keep]]), cache=cache)
        mx.eval([c.state for c in cache])

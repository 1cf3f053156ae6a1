"""Target forward passes: prefill in fixed chunks, and a tap on the final norm for hidden states."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

PREFILL_CHUNK = 512


class HiddenTap(nn.Module):
    """Wraps the target's final norm and remembers its input (pre-norm) and output (post-norm)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm
        object.__setattr__(self, "_seen", None)  # not a parameter

    def __call__(self, x: mx.array) -> mx.array:
        y = self.norm(x)
        object.__setattr__(self, "_seen", (x, y))
        return y

    def hidden(self, source: str) -> mx.array:
        """[1, L, H] of the last forward: "pre_norm" or "post_norm"."""
        pre, post = self._seen
        return pre if source == "pre_norm" else post


def hidden_tap(model) -> HiddenTap:
    """Installs the tap once; it changes no numerics."""
    if not isinstance(model.model.norm, HiddenTap):
        model.model.norm = HiddenTap(model.model.norm)
    return model.model.norm


def extend(model, cache, ids, on_chunk=None) -> None:
    """Runs token ids through the model in fixed chunks, filling `cache` (no logits kept)."""
    ids = mx.array(ids)
    for start in range(0, ids.size, PREFILL_CHUNK):
        model(ids[None, start : start + PREFILL_CHUNK], cache=cache)
        if on_chunk:
            on_chunk()
        mx.eval([c.state for c in cache])


def prefill(model, cache, prompt_ids, on_chunk=None) -> mx.array:
    """Runs the prompt through the model in fixed chunks, filling `cache`; the last token goes
    alone. Returns the last position's logits [1, V]. `on_chunk()` is called after every forward
    (for reading a HiddenTap). The chunking depends only on the length: the canonical recomputation
    in `daemon.ties` relies on it."""
    if len(prompt_ids) > 1:
        extend(model, cache, prompt_ids[:-1], on_chunk)
    logits = model(mx.array(prompt_ids[-1:])[None], cache=cache)[:, -1, :]
    if on_chunk:
        on_chunk()
    return logits

"""Target forward passes: prefill in fixed chunks, and taps for the hidden states a drafter reads."""

from __future__ import annotations

import functools
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from daemon.engine.rows import Forward, drain
from daemon.models.target import target_embedding, trunk

PREFILL_CHUNK = 512


def source_parts(source: str) -> tuple[str, tuple[int, ...]]:
    """A drafter's hidden source: the final state ("post_norm" or "pre_norm"; "layers": none), then
    the outputs of the blocks it names (-1: the embedding's): "post_norm+9+19" -> ("post_norm", (9, 19))."""
    final, *blocks = source.split("+")
    return final, tuple(int(b) for b in blocks)


def feature_source(final: str, blocks) -> str:
    return final + "".join(f"+{b}" for b in blocks)


def join_streams(streams: mx.array, pre_mix: mx.array) -> mx.array:
    """A hyper-connection trunk's state after its last layer (DeepSeek V4: streams [B, L, hc, H]
    and the pre-mix [B, L, hc] the trunk collapses them with) as one hidden array [B, L, hc * (H + 1)]
    in float32 (exact for the streams' bf16 or fp16)."""
    flat = streams.reshape(*streams.shape[:2], -1).astype(mx.float32)
    return mx.concatenate([flat, pre_mix.astype(mx.float32)], axis=-1)


def split_streams(hidden: mx.array, hc: int) -> tuple[mx.array, mx.array]:
    """`join_streams` undone: (streams [B, L, hc, H] float32, pre-mix [B, L, hc] float32)."""
    flat, pre_mix = hidden[..., :-hc], hidden[..., -hc:]
    return flat.reshape(*flat.shape[:2], hc, -1), pre_mix


class HiddenTap(nn.Module):
    """Wraps the target's final norm and remembers its input (pre-norm) and output (post-norm);
    "streams" reads the last block's output instead (a hyper-connection trunk's, `join_streams`)."""

    def __init__(self, norm: nn.Module, blocks: list, embedding: nn.Module):
        super().__init__()
        self.norm = norm
        object.__setattr__(self, "_seen", None)  # not a parameter
        object.__setattr__(self, "_blocks", blocks)
        object.__setattr__(self, "_embedding", embedding)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.norm(x)
        object.__setattr__(self, "_seen", (x, y))
        return y

    def hidden(self, source: str) -> mx.array:
        """[B, L, H * (1 + blocks)] of the last forward: the final state `source` names, then the
        named blocks' outputs ("layers": those alone)."""
        final, blocks = source_parts(source)
        if final == "streams":
            return join_streams(*self._blocks[-1]._out)
        taps = [(self._blocks[b] if b >= 0 else self._embedding)._out for b in blocks]
        if final != "layers":
            pre, post = self._seen
            taps.insert(0, pre if final == "pre_norm" else post)
        return mx.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]


@functools.cache
def _recording(cls: type) -> type:
    """The block class that also remembers its last output (same computation)."""

    class Recording(cls):
        records = True

        def __call__(self, *args, **kwargs):
            out = super().__call__(*args, **kwargs)
            object.__setattr__(self, "_out", out)
            return out

    return Recording


def hidden_tap(model, source: str = "post_norm") -> HiddenTap:
    """Installs the tap once, and a recording on each block `source` names (and on the embedding
    for -1); no numerics change."""
    body = trunk(model)
    layers, name = body.layers, "norm" if "norm" in body else "norm_f"  # Nemotron-H's
    embedding = target_embedding(model)
    if not isinstance(body[name], HiddenTap):
        setattr(body, name, HiddenTap(body[name], layers, embedding))
    final, blocks = source_parts(source)
    for b in (*blocks, len(layers) - 1) if final == "streams" else blocks:
        module = layers[b] if b >= 0 else embedding
        if not getattr(type(module), "records", False):
            module.__class__ = _recording(type(module))
    return body[name]


Chunk = int | Callable[[], int]  # prefill rows per forward, or asked before every forward


def _size(chunk: Chunk) -> int:
    return chunk() if callable(chunk) else chunk


def extend_rows(cache, ids, tap: HiddenTap | None = None, source: str | None = None, chunk: Chunk = PREFILL_CHUNK,
                leave: bool = False):
    """Runs token ids through the target in chunks, filling `cache` (no logits kept). A coroutine
    (daemon.engine.rows); returns (the hidden states of each chunk when `source` is given, the ids
    run). `leave`: stop while the rest fits in one chunk, for the caller's last forward."""
    hidden, start = [], 0
    while start < len(ids):
        n = _size(chunk)
        if leave and len(ids) - start <= n:
            break
        ran = yield Forward(list(ids[start : start + n]), cache, "none", tap, source)
        start = min(start + n, len(ids))
        if source is not None:
            hidden.append(ran.hidden)
    return hidden, start


def prefill_rows(cache, prompt_ids, tap: HiddenTap | None = None, source: str | None = None, chunk: Chunk = PREFILL_CHUNK,
                 last_alone: bool = True):
    """Runs the prompt through the target in chunks, filling `cache`. A coroutine; returns (the last
    position's logits [1, V], the hidden states' chunks when `source` is given). `last_alone`: the
    last token goes in a forward of its own, so that, with the default chunk, the chunking depends
    only on the length (the canonical recomputation in `daemon.engine.ties` relies on it); else it
    ends the last chunk (one forward fewer: a batch's sequences save a step)."""
    head = prompt_ids[:-1] if last_alone else prompt_ids
    hidden, start = yield from extend_rows(cache, head, tap, source, chunk, leave=not last_alone)
    ran = yield Forward(list(prompt_ids[start:]), cache, "last", tap, source)
    return ran.logits, hidden + ([ran.hidden] if source is not None else [])


def prefill(model, cache, prompt_ids) -> mx.array:
    """The prompt through the model by itself, canonically chunked; the last position's logits [1, V]."""
    return drain(model, prefill_rows(cache, prompt_ids))[0]

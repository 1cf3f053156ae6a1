"""Plain decoding: one target forward and one token per step.

Greedy tokens go through the near-tie guard, so they equal speculative decoding's. On a GPU (Metal, CUDA) the
next forward is queued before the current token is read (one host sync per token, overlapped with
GPU compute), as in mlx-lm's generate_step; on a CPU a queued forward only competes with the
current one for the cores, so there each token is read, checked and yielded before the next
forward is built. Its steps are a coroutine (daemon.engine.rows): each forward is asked of whoever
runs the sequence, alone or in a batch (queued forwards only alone, on a GPU).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from daemon.engine.choose import TokenChooser
from daemon.engine.records import Step
from daemon.engine.rows import Forward
from daemon.engine.sampling import token_logprobs
from daemon.models.loading import on_gpu


@dataclass
class Decoding:
    """What every step of one request works with."""

    model: nn.Module
    cache: list  # the target's KV cache, holding every emitted token but the last
    chooser: TokenChooser
    vocab: int  # the logits' width
    logprobs: int | None = None  # report each token's log-probability and the top n (None: no)


def plain_step(dec: Decoding, token: int, history: list[int], tap=None, source: str | None = None):
    """Runs `token` (the last of `history`) through the target: a coroutine (daemon.engine.rows)
    that returns (the next token, the Ran: its logits [1, V] and, with a source, hidden states)."""
    ran = yield Forward([token], dec.cache, "all", tap, source)
    return dec.chooser.choose(ran.logits, history), ran


def plain_steps(dec: Decoding, prompt_ids, logits: mx.array, batched: bool = False) -> Generator:
    """logits [1, V]: the prompt's last position. `batched`: the sequence runs beside others (on
    a GPU, by itself, its forwards are queued)."""
    chooser = dec.chooser  # queued steps may redo a step, and draw without a grammar or penalties
    queued = not batched and on_gpu() and can_trim_prompt_cache(dec.cache)
    queued = queued and chooser.grammar is None and not chooser.processors
    steps = _queued_steps if queued else _eager_steps
    return steps(dec, list(prompt_ids), logits)


def _eager_steps(dec: Decoding, history: list[int], logits: mx.array) -> Generator:
    token = dec.chooser.choose(logits, history)
    while True:
        history.append(token)
        yield Step((token,), logprobs=token_logprobs(logits, [token], dec.logprobs))
        token, ran = yield from plain_step(dec, token, history)
        logits = ran.logits


def _queued_steps(dec: Decoding, history: list[int], logits: mx.array) -> Generator:
    model, cache, chooser = dec.model, dec.cache, dec.chooser
    y, margin = chooser.draw(logits)
    mx.async_eval(y, margin)
    while True:
        next_logits = model(y[:, None], cache=cache)[:, -1, :]
        next_y, next_margin = chooser.draw(next_logits)
        mx.async_eval(next_y, next_margin)
        token, checked = chooser.read(y, margin, history)
        if checked != token:  # the queued step read the wrong token: redo it
            token, y = checked, mx.array([checked])
            trim_prompt_cache(cache, 1)
            next_logits = model(y[:, None], cache=cache)[:, -1, :]
            next_y, next_margin = chooser.draw(next_logits)
            mx.async_eval(next_y, next_margin)
        history.append(token)
        yield Step((token,), logprobs=token_logprobs(logits, [token], dec.logprobs))
        logits, y, margin = next_logits, next_y, next_margin

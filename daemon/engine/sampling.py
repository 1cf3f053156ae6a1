"""Turning logits into tokens: the target distribution (temperature, top-k, top-p) and draws from it.

Speculative verification applies exactly these functions to the target's logits, so plain and
speculative sampling draw from the same distribution.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_k, apply_top_p


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    seed: int | None = None
    presence_penalty: float = 0.0  # daemon.engine.penalties
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def target_logprobs(logits: mx.array, params: SamplingParams) -> mx.array:
    """Log-probabilities of the distribution sampling draws from. logits: [..., V] -> [..., V]."""
    logits = logits.astype(mx.float32) / params.temperature
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if 0 < params.top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, params.top_k)
    if params.top_p < 1:
        logprobs = apply_top_p(logprobs, params.top_p)
    return logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)


def new_key(seed: int | None) -> mx.array:
    """A per-request PRNG key: seeded requests repeat, others differ."""
    return mx.random.key(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))


def sample(logits: mx.array, params: SamplingParams, key: mx.array) -> mx.array:
    """One token per row. logits: [..., V] -> [...] (int)."""
    if params.greedy:
        return mx.argmax(logits, axis=-1)
    return mx.random.categorical(target_logprobs(logits, params), key=key)


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability under the model (temperature 1) and the most likely tokens."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: mx.array, tokens: list[int], top: int | None) -> tuple[TokenLogprob, ...]:
    """logits [n, V] (n >= len(tokens)): row i scores tokens[i]. top None: not asked for, ()."""
    if top is None:
        return ()
    rows = logits[: len(tokens)].astype(mx.float32)
    logprobs = rows - mx.logsumexp(rows, axis=-1, keepdims=True)
    chosen = logprobs[mx.arange(len(tokens)), mx.array(tokens)]
    best = mx.argsort(-logprobs, axis=-1)[:, :top] if top else mx.zeros((len(tokens), 0), mx.int32)
    best_lp = mx.take_along_axis(logprobs, best, axis=-1)
    mx.eval(chosen, best, best_lp)
    return tuple(
        TokenLogprob(t, lp, tuple(zip(ids, lps)))
        for t, lp, ids, lps in zip(tokens, chosen.tolist(), best.tolist(), best_lp.tolist())
    )

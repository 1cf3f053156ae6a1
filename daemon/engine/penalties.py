"""Penalties and biases on the target's logits (OpenAI's `presence_penalty`, `frequency_penalty`,
`logit_bias`; `repetition_penalty` as mlx-lm's and vLLM's servers take it), applied with mlx-lm's
own logits processors over the last `CONTEXT` tokens (prompt and answer), as mlx-lm's server does.

They depend on the tokens before a position, so under speculation each verified row gets the
history up to its own position (the accepted drafts before it): the adjusted target is the
distribution, and speculation stays lossless against it. Drafts are not adjusted; greedy
verification and rejection sampling only read the target.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

from daemon.engine.sampling import SamplingParams

CONTEXT = 20  # tokens the penalties look back over (mlx-lm's default)


def processors(sampling: SamplingParams) -> list:
    """mlx-lm's processors for the request's penalties; empty when it sets none."""
    return make_logits_processors(
        dict(sampling.logit_bias) or None,
        sampling.repetition_penalty if sampling.repetition_penalty != 1.0 else None, CONTEXT,
        sampling.presence_penalty or None, CONTEXT,
        sampling.frequency_penalty or None, CONTEXT,
    )


def adjusted(procs: list, logits: mx.array, history: Sequence[int]) -> mx.array:
    """logits [V] or [1, V] after `history` -> [1, V] with the penalties applied."""
    out = logits.reshape(1, -1)  # a new array: the processors write into theirs
    tokens = mx.array(list(history[-CONTEXT:]), mx.int32)
    for process in procs:
        out = process(tokens, out)
    return out


def adjusted_rows(procs: list, logits: mx.array, history: Sequence[int], drafts: Sequence[int]) -> mx.array:
    """logits [k+1, V], row j scoring the position after drafts[:j] -> the same, each row adjusted
    with its own history."""
    rows = [adjusted(procs, logits[j], [*history[-CONTEXT:], *drafts[:j]]) for j in range(logits.shape[0])]
    return mx.concatenate(rows, axis=0)

"""Greedy output that does not depend on how many rows a forward pass had.

Batched verification (k+1 rows) and one-row decode sum in different orders (BLAS kernels, thread
splits), so their logits drift apart by ~1e-5..1e-4 and a near-tie can flip. mtpd decides every
greedy token the same way in both decoders: when the top-2 margin of the fast logits is at least
`margin` (far above the drift) it takes the fast argmax, which every other path shares; below it the
token is the argmax of a *canonical* recomputation, a fresh prefill of the whole sequence in fixed
chunks that depends on the token ids alone. So plain and speculative decoding both emit the
canonical token at every position, as long as the drift stays below margin / 4.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from daemon.engine.forward import prefill

DEFAULT_MARGIN_FP32 = 2e-3
DEFAULT_MARGIN_HALF = 5e-2  # fp16 / bf16 / quantized activations drift more


def greedy_with_margin(logits: mx.array) -> tuple[mx.array, mx.array]:
    """[..., V] -> ([...] argmax, [...] gap between the two largest logits). The second largest is
    the maximum with the argmax's entry masked out (a tie gives 0): cheaper than mx.topk on a CPU."""
    logits = logits.astype(mx.float32)
    best = mx.argmax(logits, axis=-1, keepdims=True)
    top = mx.take_along_axis(logits, best, axis=-1)
    second = mx.put_along_axis(logits, best, mx.array(-mx.inf, mx.float32), axis=-1).max(axis=-1, keepdims=True)
    return best.squeeze(-1), (top - second).squeeze(-1)


class NearTieGuard:
    def __init__(self, model, margin: float):
        self.model = model
        self.margin = margin
        self.rechecks = 0

    def token(self, ids: Sequence[int], fast_token: int, fast_margin: float, extra: Sequence[int] = (),
              allowed: mx.array | None = None, adjust=None) -> int:
        """The greedy token after `ids` + `extra`, given the fast path's argmax and top-2 margin
        (the sequence is only put together for a recomputation); `allowed` [V]: a grammar's mask;
        `adjust(logits, history)`: the request's penalties."""
        if fast_margin >= self.margin:
            return fast_token
        self.rechecks += 1
        logits = prefill(self.model, make_prompt_cache(self.model), [*ids, *extra])
        if adjust is not None:
            logits = adjust(logits, [*ids, *extra])
        if allowed is not None:
            logits = mx.where(allowed, logits, -mx.inf)
        return mx.argmax(logits, axis=-1).item()

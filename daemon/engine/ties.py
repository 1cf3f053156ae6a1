"""Greedy output that does not depend on how many rows a forward pass had.

Batched verification (k+1 rows) and one-row decode sum in different orders (BLAS kernels, thread
splits), so their logits drift apart by ~1e-5..1e-4 and a near-tie can flip. mtpd decides every
greedy token the same way in both decoders: when the top-2 margin of the fast logits is at least
`margin` (far above the drift) it takes the fast argmax, which every other path shares; below it the
token is the argmax of a *canonical* recomputation, a fresh prefill of the whole sequence in fixed
chunks that depends on the token ids alone. So plain and speculative decoding both emit the
canonical token at every position, as long as the drift stays below margin / 4.

A recomputation's whole chunks depend on their tokens alone, so the guard keeps them (its own KV
cache, for the rest of the sequence) and the next recomputation runs only from the first chunk
whose tokens changed: at a 3,000-token context a recomputation from scratch took ~7 s on a 2-vCPU
CPU, the length of ~100 decode steps. A model whose cache cannot be trimmed (a recurrent layer)
recomputes from scratch every time.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from daemon.engine.forward import PREFILL_CHUNK, extend_rows, prefill, prefill_rows
from daemon.engine.rows import drain

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
        self._cache = None  # the last recomputation's cache, holding its whole chunks (`_ids`) alone
        self._ids: list[int] = []

    def token(self, ids: Sequence[int], fast_token: int, fast_margin: float, extra: Sequence[int] = (),
              allowed: mx.array | None = None, adjust=None) -> int:
        """The greedy token after `ids` + `extra`, given the fast path's argmax and top-2 margin
        (the sequence is only put together for a recomputation); `allowed` [V]: a grammar's mask;
        `adjust(logits, history)`: the request's penalties."""
        if fast_margin >= self.margin:
            return fast_token
        self.rechecks += 1
        logits = self._canonical([*ids, *extra])
        if adjust is not None:
            logits = adjust(logits, [*ids, *extra])
        if allowed is not None:
            logits = mx.where(allowed, logits, -mx.inf)
        return mx.argmax(logits, axis=-1).item()

    def _canonical(self, seq: list[int]) -> mx.array:
        """`prefill(model, fresh cache, seq)`'s logits [1, V], run from the first whole chunk of `seq`
        the kept cache does not hold. Keeps the whole chunks (the prefill's chunks of PREFILL_CHUNK
        over all but the last token) for the next time."""
        whole = (len(seq) - 1) // PREFILL_CHUNK * PREFILL_CHUNK
        if self._cache is None:
            self._cache = make_prompt_cache(self.model)
        if not can_trim_prompt_cache(self._cache):
            return prefill(self.model, make_prompt_cache(self.model), seq)
        same = next((i for i, (a, b) in enumerate(zip(self._ids, seq[:whole])) if a != b), min(len(self._ids), whole))
        kept = same // PREFILL_CHUNK * PREFILL_CHUNK
        trim_prompt_cache(self._cache, len(self._ids) - kept)
        drain(self.model, extend_rows(self._cache, seq[kept:whole]))
        self._ids = seq[:whole]
        logits = drain(self.model, prefill_rows(self._cache, seq[whole:]))[0]
        mx.eval(logits)
        trim_prompt_cache(self._cache, len(seq) - whole)
        return logits

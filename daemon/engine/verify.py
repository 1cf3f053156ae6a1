"""Verification: how many drafted tokens the target accepts, and what it emits after them.

Accepted tokens are drafts the target keeps. At the first rejection the target emits a *recovered*
token (greedy: its own argmax; sampling: a draw from the residual max(0, p - q)); after k accepts it
emits a *bonus* token drawn from its distribution at position k+1. Leviathan et al. (2023) show
that sampling this way leaves the target's distribution unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from daemon.engine.sampling import SamplingParams, target_logprobs
from daemon.engine.ties import NearTieGuard, greedy_with_margin


def sampled_accepted(p_draft: Sequence[float], q_draft: Sequence[float], uniform: Sequence[float]) -> int:
    """Draft j is accepted with probability min(1, p(d_j) / q(d_j)); stop at the first rejection.
    p_draft, q_draft: the target's and the drafter's probability of each drafted token."""
    n = 0
    while n < len(p_draft) and uniform[n] * q_draft[n] < p_draft[n]:
        n += 1
    return n


def residual_logprobs(p: mx.array, q: mx.array) -> mx.array:
    """log normalize(max(0, p - q)). p, q: [V] probabilities. Where p <= q everywhere (only if
    p == q, when no rejection can happen) it falls back to p."""
    residual = mx.maximum(p - q, 0.0)
    total = residual.sum()
    residual = mx.where(total > 0, residual / mx.maximum(total, 1e-30), p)
    return mx.log(residual)


def verify_greedy(logits: mx.array, drafts: list[int], guard: NearTieGuard, history: list[int],
                  allowed: mx.array | None = None, adjust=None) -> list[int]:
    """The tokens greedy verification emits: the drafts the target's (tie-guarded) argmax agrees
    with, then its own token. logits: [k+1, V], row i scoring the position after draft i, already
    masked by a grammar's `allowed` [k+1, V] when there is one and adjusted by the request's
    penalties (the guard does both to its recomputation; `adjust` is how)."""
    target, margins = greedy_with_margin(logits)
    mx.eval(target, margins)
    target, margins = target.tolist(), margins.tolist()
    out: list[int] = []
    for i in range(len(drafts) + 1):
        out.append(guard.token(history, target[i], margins[i], extra=out, allowed=None if allowed is None else allowed[i],
                               adjust=adjust))
        if i == len(drafts) or drafts[i] != out[-1]:
            break
    return out


def verify_sampled(logits: mx.array, drafts: list[int], q_rows: list[mx.array], sampling: SamplingParams,
                   keys: list[mx.array]) -> list[int]:
    """The tokens rejection sampling emits: the accepted drafts, then a recovered token from the
    residual (at the first rejection) or a bonus token from p. logits: [k+1, V]; q_rows: the
    drafter's q [V] per draft; keys: two PRNG keys (acceptance tests, the last token)."""
    k = len(drafts)
    logp = target_logprobs(logits, sampling)
    q, ids, rows = mx.stack(q_rows), mx.array(drafts), mx.arange(k)
    p_draft, q_draft = mx.exp(logp[rows, ids]), q[rows, ids]
    uniform = mx.random.uniform(shape=(k,), key=keys[0])
    mx.eval(p_draft, q_draft, uniform)
    accepted = sampled_accepted(p_draft.tolist(), q_draft.tolist(), uniform.tolist())
    last = residual_logprobs(mx.exp(logp[accepted]), q[accepted]) if accepted < k else logp[k]
    return drafts[:accepted] + [mx.random.categorical(last, key=keys[1]).item()]

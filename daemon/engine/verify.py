"""Verification: how many drafted tokens the target accepts, and what it emits after them.

Accepted tokens are drafts the target keeps. At the first rejection the target emits a *recovered*
token (greedy: its own argmax; sampling: a draw from the residual max(0, p - q)); after k accepts it
emits a *bonus* token drawn from its distribution at position k+1. Leviathan et al. (2023) show
that sampling this way leaves the target's distribution unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx


def greedy_accepted(drafts: Sequence[int], target: Sequence[int]) -> int:
    """Length of the longest prefix of `drafts` equal to the target's own choices."""
    n = 0
    while n < len(drafts) and drafts[n] == target[n]:
        n += 1
    return n


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

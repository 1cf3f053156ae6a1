"""The drafter's training losses and its teacher-forced evaluation: depth 1, and depth 2 fed the
drafter's own block output as a chained draft is (`two_depths`)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_causal_mask

from daemon.training.data import answer_positions, context_offers, drafter_batch
from daemon.training.settings import CATEGORIES


def subset_labels(labels: mx.array, head_vocab: list[int] | None, vocab: int) -> mx.array:
    """Full-vocabulary ids -> head indices; -1 where the head cannot express the token."""
    if head_vocab is None:
        return labels
    lookup = np.full(vocab, -1, np.int32)
    lookup[head_vocab] = np.arange(len(head_vocab))
    return mx.array(lookup)[labels]


def _cross_entropy(drafter, target, out, labels, mask) -> mx.array:
    logits = drafter.head_logits(out, target)
    valid = mask & (labels >= 0)
    ce = nn.losses.cross_entropy(logits, mx.maximum(labels, 0), reduction="none")
    return (ce * valid).sum() / mx.maximum(valid.sum(), 1)


def loss_fn(drafter, target, hidden, tokens, labels, mask, offers):
    out, _ = drafter.features(hidden, tokens, None, target, offers)
    return _cross_entropy(drafter, target, out, labels, mask)


class _FirstDepth:
    """A stand-in KV cache for a whole-sequence pass that keeps its keys and values."""

    offset = 0

    def update_and_fetch(self, keys, values):
        self.keys, self.values = keys, values
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size=None):
        return create_causal_mask(n) if return_array else "causal"


class _SecondDepth:
    """Row i drafts at depth 2 after position i: as when drafting, it sees the first depth's keys
    up to position i (the drafter's cache of real hidden states) and its own key (position i + 1)."""

    offset = 1

    def __init__(self, first: _FirstDepth):
        self.first = first

    def update_and_fetch(self, keys, values):
        return mx.concatenate([self.first.keys, keys], axis=2), mx.concatenate([self.first.values, values], axis=2)

    def make_mask(self, n: int, return_array: bool = False, window_size=None):
        return mx.concatenate([create_causal_mask(n), mx.eye(n, dtype=mx.bool_)], axis=1)


def _next(x: mx.array) -> mx.array:
    """Depth 2's copy of a per-position array: the next position's, the last repeated (padding)."""
    return mx.concatenate([x[:, 1:], x[:, -1:]], axis=1)


def two_depths(drafter, target, hidden, tokens, offers=None) -> tuple[mx.array, mx.array]:
    """Teacher-forced drafts at depths 1 and 2. Depth 1 at position i reads (h_i, t_{i+1}); depth 2
    reads the drafter's own block output there and t_{i+2} (and the lookup's offer after t_{i+2}),
    as a chained draft does once the first is accepted. Returns the shared_head.norm outputs
    [B, L, H] of both (depth 2's last row has no token and is padding)."""
    first = _FirstDepth()
    out1, own = drafter.features(hidden, tokens, first, target, offers)
    offers2 = None if offers is None else tuple(map(_next, offers))
    out2, _ = drafter.features(drafter.chained(own, hidden), _next(tokens), _SecondDepth(first), target, offers2)
    return out1, out2


def _depth2(labels, mask):
    """Labels and mask of depth 2: those of the next position, none for the last."""
    return _next(labels), mx.concatenate([mask[:, 1:], mx.zeros_like(mask[:, -1:])], axis=1)


def chained_loss_fn(drafter, target, hidden, tokens, labels, mask, offers, weight: float):
    out1, out2 = two_depths(drafter, target, hidden, tokens, offers)
    labels2, mask2 = _depth2(labels, mask)
    return _cross_entropy(drafter, target, out1, labels, mask) + weight * _cross_entropy(drafter, target, out2, labels2, mask2)


def evaluate(drafter, lm, f: dict, rows: np.ndarray, lookup_vocab, batch: int, depth: int = 1) -> dict[str, float]:
    """Teacher-forced top-1 agreement with the target at draft position 1 (depth 2: position 2
    after an accepted first draft), per category, counted where the drafted token belongs to the
    answer (a prompt's tokens are never drafted when serving): on the target's own greedy text
    this is the greedy acceptance rate of that draft."""
    hits = np.zeros(len(CATEGORIES))
    totals = np.zeros(len(CATEGORIES))
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        hidden, tokens, labels, mask = drafter_batch(f, part)
        mask = mask & answer_positions(f, part, mask.shape[1])
        offers = tuple(map(mx.array, context_offers(f, part))) if drafter.config.reads_offers else None
        if depth == 1:
            logits, _ = drafter(hidden, tokens, None, lm.model, offers)
        else:
            logits = drafter._full_vocab(drafter.head_logits(two_depths(drafter, lm.model, hidden, tokens, offers)[1], lm.model))
            labels, mask = _depth2(labels, mask)
        correct = (mx.argmax(logits, axis=-1) == labels) & mask
        mx.eval(correct, mask)
        for row, c, m in zip(part, np.array(correct), np.array(mask)):
            hits[f["category"][row]] += c.sum()
            totals[f["category"][row]] += m.sum()
    result = {name: float(hits[i] / totals[i]) for i, name in enumerate(CATEGORIES) if totals[i]}
    result["all"] = float(hits.sum() / max(totals.sum(), 1))
    return result



"""The drafter's training losses and its teacher-forced evaluation: depth 1, and the later depths
fed the drafter's own block output as a chained draft is (`chain_depths`)."""

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


class _LaterDepth:
    """Row i drafts at depth d > 1 after position i: as when drafting, it sees the first depth's keys
    up to position i (the drafter's cache of real hidden states), then the keys the chain put at
    positions i + 1 .. i + d - 2 (the earlier depths' rows i) and its own (position i + d - 1)."""

    def __init__(self, first: _FirstDepth, earlier: list[_LaterDepth]):
        self.first, self.earlier = first, earlier
        self.offset = len(earlier) + 1

    def update_and_fetch(self, keys, values):
        self.keys, self.values = keys, values
        chain = [self.first, *self.earlier, self]
        return mx.concatenate([c.keys for c in chain], axis=2), mx.concatenate([c.values for c in chain], axis=2)

    def make_mask(self, n: int, return_array: bool = False, window_size=None):
        return mx.concatenate([create_causal_mask(n)] + [mx.eye(n, dtype=mx.bool_)] * self.offset, axis=1)


def _next(x: mx.array, by: int = 1) -> mx.array:
    """A later depth's copy of a per-position array: the one `by` positions on, the last repeated (padding)."""
    return mx.concatenate([x[:, by:]] + [x[:, -1:]] * by, axis=1) if by else x


def chain_depths(drafter, target, hidden, tokens, offers=None, depths: int = 2) -> list[mx.array]:
    """Teacher-forced drafts at depths 1 .. `depths`. Depth 1 at position i reads (h_i, t_{i+1});
    depth d reads the drafter's own block output of depth d - 1 there and t_{i+d} (and the lookup's
    offer after t_{i+d}), as a chained draft does once the first d - 1 are accepted (EAGLE's
    training-time test). Returns the shared_head.norm outputs [B, L, H] of each depth (depth d's
    last d - 1 rows have no token and are padding)."""
    first = _FirstDepth()
    out, own = drafter.features(hidden, tokens, first, target, offers)
    outs, later = [out], []
    for d in range(1, depths):
        cache = _LaterDepth(first, list(later))
        moved = None if offers is None else tuple(_next(o, d) for o in offers)
        out, own = drafter.features(drafter.chained(own, hidden), _next(tokens, d), cache, target, moved)
        outs.append(out)
        later.append(cache)
    return outs


def _at_depth(labels, mask, d: int):
    """Labels and mask of depth d: those d - 1 positions on, none for the last d - 1."""
    return _next(labels, d - 1), mx.concatenate([mask[:, d - 1 :], mx.zeros_like(mask[:, : d - 1])], axis=1)


def chained_loss_fn(drafter, target, hidden, tokens, labels, mask, offers, weight: float, depths: int = 2):
    outs = chain_depths(drafter, target, hidden, tokens, offers, depths)
    terms = [_cross_entropy(drafter, target, out, *_at_depth(labels, mask, d + 1)) for d, out in enumerate(outs)]
    return terms[0] + weight * sum(terms[1:])


def draft_hits(drafter, lm, f: dict, rows: np.ndarray, depth: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced drafts of `rows` at depths 1 .. `depth` (depth d after accepted drafts at the
    positions before it): hits [len(rows), depth, L], True where draft d of a round that starts at
    drafter position i (after token i + 1) is the target's own greedy token, and counted [same shape],
    True where that token belongs to the answer (a prompt's tokens are never drafted when serving)."""
    hidden, tokens, labels, mask = drafter_batch(f, rows)
    mask = mask & answer_positions(f, rows, mask.shape[1])
    offers = tuple(map(mx.array, context_offers(f, rows))) if drafter.config.reads_offers else None
    hits, counted = [], []
    for d, out in enumerate(chain_depths(drafter, lm.model, hidden, tokens, offers, depth), 1):
        logits = drafter._full_vocab(drafter.head_logits(out, lm.model))
        at, m = _at_depth(labels, mask, d)
        hits.append((mx.argmax(logits, axis=-1) == at) & m)
        counted.append(m)
    hits, counted = mx.stack(hits, axis=1), mx.stack(counted, axis=1)
    mx.eval(hits, counted)
    return np.array(hits), np.array(counted)


def evaluate(drafter, lm, f: dict, rows: np.ndarray, batch: int, depths: int = 1) -> list[dict[str, float]]:
    """Teacher-forced top-1 agreement with the target at draft positions 1 .. `depths` (each after
    accepted drafts at the positions before it), per category, counted where the drafted token
    belongs to the answer: on the target's own greedy text this is the greedy acceptance rate of
    that draft. One dict per position, from one chained pass over each batch."""
    hits = np.zeros((depths, len(CATEGORIES)))
    totals = np.zeros((depths, len(CATEGORIES)))
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        correct, counted = draft_hits(drafter, lm, f, part, depths)
        for row, c, m in zip(part, correct, counted):
            hits[:, f["category"][row]] += c.sum(axis=-1)
            totals[:, f["category"][row]] += m.sum(axis=-1)
    results = []
    for h, t in zip(hits, totals):
        result = {name: float(h[i] / t[i]) for i, name in enumerate(CATEGORIES) if t[i]}
        result["all"] = float(h.sum() / max(t.sum(), 1))
        results.append(result)
    return results


def fixed_rounds(hits: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """What a fixed:K run accepts on one sequence, from its teacher-forced `hits` and `counted`
    [K, L] (draft_hits' row): the first round starts after the first answer token (the prompt's
    pass gives that one), each next one after the bonus token of the one before, while a whole round
    fits in the answer. Returns [K + 1]: how many rounds accepted exactly j drafts. Rounds start
    where the target corrected the drafter more often than teacher forcing's every position does,
    so these rates run below draft_hits' (what a fixed:K bench measures by position)."""
    k = hits.shape[0]
    rounds = np.zeros(k + 1, np.int64)
    answer = np.nonzero(counted[0])[0]
    if not len(answer):
        return rounds
    i, last = answer[0] + 1, answer[-1]
    while i + k - 1 <= last:
        accepted = 0
        while accepted < k and hits[accepted, i]:
            accepted += 1
        rounds[accepted] += 1
        i += accepted + 1
    return rounds



"""A block drafter's side of one request, across its rounds (daemon.models.block).

Its caches hold context positions only: the target's tapped states of every position whose token is
in the target's cache. Those of a round wait here (`pending`) and are appended at the next block
forward, which also runs the block [t, mask x (B - 1)] from the last token t on; nothing drafted is
ever cached, so a rewind after a drafted round is the same as reading a plain step. The drafts are
taken from the proposal rows in order, each row's logits first given the Markov head's bias from
the draft before it (the last token for the first), so that sampling divides by the q it drew from.
Same interface as daemon.drafting.session.DraftingSession.
"""

from __future__ import annotations

from collections.abc import Generator

import mlx.core as mx

from daemon.drafting.lookup import NgramIndex
from daemon.drafting.session import Drafts, finish, take
from daemon.engine.grammar import Grammar
from daemon.engine.rows import DraftCall
from daemon.engine.sampling import SamplingParams


class BlockSession:
    def __init__(self, drafter, model, index: NgramIndex):
        self.drafter, self.model, self.index = drafter, model, index
        self.caches = drafter.make_cache()
        self.pending: list[mx.array] = []  # tapped states [1, m, taps * H] of positions not read yet
        self.token: int | None = None  # the last token: the block's first row

    def start(self, prompt_hidden: mx.array, first_token: int) -> None:
        """Reads the prompt's positions now, as part of the prefill, all but the last (a block
        forward always has one at least to append). prompt_hidden: [1, n, taps * H]."""
        if prompt_hidden.shape[1] > 1:
            mx.eval(self.drafter.read(prompt_hidden[:, :-1], self.caches))
        self.pending, self.token = [prompt_hidden[:, -1:]], first_token

    def read(self, hidden: mx.array, tokens: list[int]) -> None:
        """Positions the target has run (their tapped states [1, m, taps * H]) and the tokens after
        them: the last is the next block's first row."""
        self.pending.append(hidden)
        self.token = tokens[-1]

    rewind = read  # the caches never hold a draft

    def drafting(self, k: int, sampling: SamplingParams, split, min_confidence: float = 0.0,
                 grammar: Grammar | None = None) -> Generator[DraftCall, tuple, Drafts]:
        """One block forward (asked as a DraftCall), then up to k drafts from its proposal rows,
        stopping at the first below `min_confidence`: the confidence head's predicted acceptance
        where the drafter has one, else its own probability of the draft."""
        config = self.drafter.config
        hidden = mx.concatenate(self.pending, axis=1) if len(self.pending) > 1 else self.pending[0]
        block = [self.token] + [config.mask_token_id] * (config.block_size - 1)
        logits, rows = yield DraftCall(self.drafter, hidden, block, self.caches)
        self.pending = []
        markov = self.drafter.markov_head if "markov_head" in self.drafter else None
        state = mx.zeros((1, config.markov_rank))
        previous = mx.array([self.token])
        out = Drafts()
        for j in range(min(k, config.proposals)):
            row, h = logits[j], rows[:, j]
            if markov is not None:
                row, state = markov.step(row, previous, h, state)
            confidence = self.drafter.confidence(h, previous) if min_confidence else None
            if not take(out, row, sampling, split, min_confidence, grammar, confidence):
                break
            previous = mx.array(out.tokens[-1:])
        return finish(out, grammar)

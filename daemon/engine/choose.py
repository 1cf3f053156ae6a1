"""The target's own token at a position: greedy through the near-tie guard, or sampled.

One `TokenChooser` per request holds its PRNG key, so every random draw of the request (plain
sampling, drafts, acceptance tests) comes from one seeded sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from daemon.engine.grammar import Grammar, masked
from daemon.engine.penalties import adjusted, adjusted_rows, processors
from daemon.engine.sampling import SamplingParams, sample
from daemon.engine.ties import NearTieGuard, greedy_with_margin


class TokenChooser:
    def __init__(self, sampling: SamplingParams, key: mx.array, guard: NearTieGuard, grammar: Grammar | None = None):
        self.sampling, self.key, self.guard, self.grammar = sampling, key, guard, grammar
        self.processors = processors(sampling)

    def adjust(self, logits: mx.array, history: Sequence[int]) -> mx.array:
        """The target's logits after `history` with the request's penalties (none: unchanged)."""
        return adjusted(self.processors, logits, history) if self.processors else logits

    def adjust_rows(self, logits: mx.array, history: Sequence[int], drafts: Sequence[int]) -> mx.array:
        """Verification rows [k+1, V], each with the history up to its position."""
        return adjusted_rows(self.processors, logits, history, drafts) if self.processors else logits

    def split(self, n: int = 1) -> list[mx.array]:
        """n fresh subkeys; the request's key moves on."""
        self.key, *subkeys = mx.random.split(self.key, n + 1)
        return subkeys

    def draw(self, logits: mx.array) -> tuple[mx.array, mx.array | None]:
        """logits [..., V] -> (tokens [...], greedy top-2 margins [...] or None when sampling); lazy."""
        if self.sampling.greedy:
            return greedy_with_margin(logits)
        return sample(logits, self.sampling, self.split()[0]), None

    def read(self, y: mx.array, margin: mx.array | None, history: Sequence[int]) -> tuple[int, int]:
        """(the drawn token, the token to emit after `history`): greedy ones pass the near-tie guard."""
        token = y.item()
        return token, token if margin is None else self.guard.token(history, token, margin.item(),
                                                                    adjust=self.adjust)

    def choose(self, logits: mx.array, history: Sequence[int]) -> int:
        """The token after `history` from its logits [V] or [1, V]; a grammar is masked in and
        moves on by it."""
        logits = self.adjust(logits, history)
        allowed = self.grammar.allowed() if self.grammar is not None else None
        y, margin = self.draw(logits if allowed is None else masked(logits, allowed))
        mx.eval(y, margin)
        token = y.item()
        if margin is not None:
            token = self.guard.token(history, token, margin.item(), allowed=allowed, adjust=self.adjust)
        if self.grammar is not None:
            self.grammar.advance([token])
        return token

"""Context lookup drafting (prompt lookup / n-gram drafting): when the last few tokens occurred
before in the prompt or the answer, propose the tokens that followed them then.

It costs no model work, and it is what makes repetitive text fast: code that restates a name, a
signature or a line, quoted input, lists that repeat their pattern. It complements the MTP drafter,
which is right more often on fresh text but one token at a time. The index is updated as tokens
arrive, so a proposal costs a dictionary lookup per n-gram length.
"""

from __future__ import annotations

from collections.abc import Iterable

from policies.plan import NO_OFFER, Proposal


class NgramIndex:
    def __init__(self, n_min: int = 2, n_max: int = 4):
        self.n_min, self.n_max = n_min, n_max
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence
        # offers[j]: (token, match) the index offered once tokens[j] was appended ((0, 0): none); an
        # MTP drafter that reads offers (daemon.models.mtp) sees offers[j] beside token j
        self.offers: list[tuple[int, int]] = []

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            end = len(self.tokens)
            for n in range(self.n_min, self.n_max + 1):
                if end >= n:
                    self._next[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)
            self.offers.append(self.offer_after(()))

    def _start(self, text: list[int]) -> tuple[int, int] | None:
        """(index of the token after the longest indexed n-gram `text` ends with, n), or None."""
        for n in range(self.n_max, self.n_min - 1, -1):
            if len(text) >= n and (start := self._next.get(tuple(text[-n:]))) is not None:
                return start, n
        return None

    def propose(self, k: int) -> Proposal:
        """Up to k tokens that followed the longest n-gram (n_max down to n_min) the text ends with."""
        found = self._start(self.tokens)
        return Proposal(tuple(self.tokens[found[0] : found[0] + k]), found[1]) if found else NO_OFFER

    def offer_after(self, drafts: tuple[int, ...]) -> tuple[int, int]:
        """(token, match) the index would offer after the text and `drafts`, not yet appended
        ((0, 0): none). With no drafts: what `propose(1)` offers."""
        found = self._start(self.tokens[-self.n_max :] + list(drafts))
        return (self.tokens[found[0]], found[1]) if found else (0, 0)

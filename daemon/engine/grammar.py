"""Constrained decoding: a request's grammar masks the target at every position it scores.

llguidance (Microsoft's grammar engine, the one behind vLLM's and SGLang's structured output)
keeps a matcher per request over the model's tokenizer; a mask costs ~50 us on a 49k vocabulary
(measured here: 47 us), far below a decoding step. Under speculation the drafter is masked too, so
every draft is one the grammar allows, and verification masks each of its k+1 rows with the state
after the drafts before it; rejected drafts are rolled back. Masking the target is the constrained
distribution itself, so greedy output equals constrained `off` and sampling keeps its distribution.

An answer whose room (max_tokens) runs out inside the grammar would end invalid: a forced call cut
in its arguments. `closing` finds a short way to complete the grammar from where it is, which the
engine takes once the room left is just enough (daemon.engine.generate).

llguidance stops a grammar that grows past its limits (LIMITS) while it is being followed. Before a
request is admitted, `check` walks that short way to completion from the start, so a schema it
cannot follow (a recursion with no end) is refused there; one that gives up later raises
GrammarError mid-answer, which ends that answer with a clear error.
"""

from __future__ import annotations

import functools

import llguidance
import llguidance.hf
import llguidance.numpy
import mlx.core as mx
import numpy as np

# a completion's tokens, by preference: an empty string where a value starts, what ends a string,
# array or object, then short values
CLOSERS = ('""', '"}', '"]', '"', "}", "]", ",", ":", "0", "1", "false", "null", "[]", "{}", "[", "{")
# llguidance's own defaults, stated: per mask ~2.5 ms of Earley items and ~15 ms of lexer work at most;
# errors without the grammar's text (it is the client's schema, and goes to the log)
LIMITS = llguidance.LLParserLimits(step_max_items=50_000, step_lexer_fuel=200_000, max_items_in_row=2_000,
                                   initial_lexer_fuel=1_000_000, max_lexer_states=250_000, max_grammar_size=500_000,
                                   verbose_errors=False)
CHECK_TOKENS = 256  # how far `check` walks toward the grammar's completion


class GrammarError(ValueError):
    """The grammar cannot be followed: past llguidance's limits, or a token it does not allow."""

    def __init__(self, error: str):
        super().__init__(error.splitlines()[0])  # llguidance's first line says it; the rest is its state


@functools.lru_cache(maxsize=4)
def _ll_tokenizer(tokenizer, vocab: int) -> llguidance.LLTokenizer:
    return llguidance.hf.from_tokenizer(tokenizer._tokenizer, n_vocab=vocab)


@functools.lru_cache(maxsize=4)
def _closers(tokenizer) -> tuple[int, ...]:
    """The CLOSERS that are one token each, in CLOSERS' order."""
    ids = (tokenizer._tokenizer.encode(text, add_special_tokens=False) for text in CLOSERS)
    return tuple(dict.fromkeys(i[0] for i in ids if len(i) == 1))


class Grammar:
    """One request's matcher. `tokenizer`: the model's TokenizerWrapper; vocab: the logits' width."""

    def __init__(self, tokenizer, grammar: str, vocab: int):
        self.vocab = vocab
        self.matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, vocab), grammar, log_level=0, limits=LIMITS)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self._bits = llguidance.numpy.allocate_token_bitmask(1, vocab)
        self._taken: list[bool] = []  # per token advanced by: did the matcher consume it (not past its end)
        self._closers = _closers(tokenizer)

    def allowed(self) -> mx.array:
        """[V] bool: the tokens the grammar allows next (EOS alone once it is complete)."""
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self._bits, 0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        return mx.array(np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab].astype(bool))

    def advance(self, tokens: list[int]) -> None:
        """Moves on by `tokens`; once the grammar is complete only its end (EOS) follows, unconsumed."""
        for token in tokens:
            taken = not self.matcher.is_stopped()
            if taken and not self.matcher.consume_token(token):
                raise GrammarError(self.matcher.get_error() or "a token it does not allow")
            self._taken.append(taken)

    def closing(self, limit: int) -> list[int] | None:
        """At most `limit` tokens that complete the grammar from here, or None."""
        return self._walk(self.matcher.deep_copy(), limit)

    def check(self) -> None:
        """Raises GrammarError where the walk to completion from here (CHECK_TOKENS at most) fails."""
        m = self.matcher.deep_copy()
        self._walk(m, CHECK_TOKENS)
        if m.is_error():
            raise GrammarError(m.get_error())

    def _walk(self, m, limit: int) -> list[int] | None:
        """A greedy walk on the matcher `m`: the tokens the grammar forces (keys, punctuation), else
        the first it allows of CLOSERS (end a string, a number, an array or object; an empty value)."""
        walk = []
        while not m.is_accepting():
            forced = m.compute_ff_tokens()
            if not forced:
                llguidance.numpy.fill_next_token_bitmask(m, self._bits, 0)
                words = self._bits[0]
                forced = next(([t] for t in self._closers if words[t // 32] >> (t % 32) & 1), None)
            forced = (forced or [])[: limit - len(walk)]  # up to the limit, so `check` meets what lies there
            if not forced or m.consume_tokens(forced) is False:
                return None
            walk += forced
        return walk

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens` the grammar allows in a row from here."""
        return self.matcher.validate_tokens(tokens)

    def rollback(self, n: int) -> None:
        """Forgets the last n tokens advanced by."""
        if n:
            taken, self._taken = self._taken[-n:], self._taken[:-n]
            if sum(taken):
                self.matcher.rollback(sum(taken))


def masked(logits: mx.array, allowed: mx.array) -> mx.array:
    """logits [..., V] with the forbidden tokens impossible; allowed: [V] or [..., V] bool."""
    return mx.where(allowed, logits, mx.array(-mx.inf, logits.dtype))

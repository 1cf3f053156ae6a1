"""The MTP drafter's side of one request, across its rounds.

The drafter reads (target hidden state h_i, next token t_{i+1}) pairs into its own KV cache, aligned
with the target's positions, and drafts t_{i+2}, then chains on its own block output. Pairs it has
not read yet wait here (`pending`): after a plain step or a copied (lookup) round it catches up on
them at its next draft; after a drafted round it drops its chained positions (`rewind`) and reads
the target's real hidden states of the accepted ones instead.

A checkpoint with several MTP layers (daemon.models.mtp.MTPLayers) runs them as they were trained:
layer j reads (layer j - 1's output at position i, t_{i+j+1}) at every position, so it lags j
positions behind the first and catches up with it; in a round, draft j + 1 comes from layer j over
its positions up to the last, fed the drafts so far as the tokens not yet known; drafts past the
last layer chain it on its own output.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.models.cache import trim_prompt_cache

from daemon.drafting.lookup import NgramIndex
from daemon.engine.forward import PREFILL_CHUNK
from daemon.engine.grammar import Grammar, masked
from daemon.engine.rollback import keep_states, restore
from daemon.engine.rows import DraftCall, drain
from daemon.engine.sampling import SamplingParams, target_logprobs
from daemon.models.mtp import mtp_layers, offer_arrays


@dataclass
class Drafts:
    tokens: list[int] = field(default_factory=list)
    q_rows: list[mx.array] = field(default_factory=list)  # sampling: the drafter's q [V] per draft
    stopped: bool = False  # a draft fell below the confidence floor and was dropped
    allowed: list[mx.array] = field(default_factory=list)  # with a grammar: its mask [V] before each draft and after the last


class DraftingSession:
    def __init__(self, drafter, model, index: NgramIndex):
        """`index`: the text so far (prompt and emitted tokens), whose offers the drafter may read;
        the pending tokens are always its last ones."""
        self.drafter, self.model, self.index = drafter, model, index
        self.layers = mtp_layers(drafter)
        self.caches = [layer.make_cache() for layer in self.layers]
        self.pending_hidden: list[mx.array] = []  # the first layer's pairs: chunks [1, m_i, H]
        self.pending_tokens: list[int] = []
        self.read_upto = [0] * len(self.layers)  # positions each later layer has read (the first's: the pairs)
        self.lagging: list[mx.array | None] = [None] * len(self.layers)  # layer j: layer j - 1's outputs it has not read
        self.chained = [0] * len(self.layers)  # rows in each cache past what it read: the last draft's chain
        self.before_chain: list = [None] * len(self.layers)  # a cache that cannot trim, before that chain

    def start(self, prompt_hidden: mx.array, first_token: int) -> None:
        """Reads the prompt's pairs now (the index holds the prompt alone), as part of the prefill,
        so that no decoding round carries a prompt-long catch-up; the last one waits for the first
        token. prompt_hidden: [1, n, H]."""
        prompt = self.index.tokens
        if len(prompt) > 1:
            mx.eval(drain(self.model, self._catch_up(prompt_hidden[:, :-1], prompt[1:], self.index.offers[1:])))
        self.pending_hidden, self.pending_tokens = [prompt_hidden[:, -1:]], [first_token]

    def read(self, hidden: mx.array, tokens: list[int]) -> None:
        """Pairs of a round the drafter did not draft: target hidden states [1, m, H], next tokens."""
        self.pending_hidden.append(hidden)
        self.pending_tokens.extend(tokens)

    def rewind(self, hidden: mx.array, tokens: list[int]) -> None:
        """After a drafted round: drop the chain; the target's hidden states [1, m, H] of the kept
        positions and the tokens after them are what it reads next."""
        for cache, chained, kept in zip(self.caches, self.chained, self.before_chain):
            if kept is None:
                trim_prompt_cache([cache], chained)
            else:
                restore([cache], kept)
        self.chained = [0] * len(self.layers)
        self.pending_hidden, self.pending_tokens = [hidden], list(tokens)

    def drafting(self, k: int, sampling: SamplingParams, split, min_confidence: float = 0.0,
                 grammar: Grammar | None = None) -> Generator[DraftCall, tuple, Drafts]:
        """Catches up on the pending pairs, then chains up to k drafts, stopping at the first it gives
        a probability below `min_confidence` (dropped): a coroutine that asks for each drafter
        forward (a DraftCall; daemon.engine.rows) and returns the Drafts. `split(n)`: fresh PRNG
        keys (sampling). A grammar masks every draft and moves on by the kept ones (the caller
        rolls it back)."""
        unseen = mx.concatenate(self.pending_hidden, axis=1) if len(self.pending_hidden) > 1 else self.pending_hidden[0]
        tokens = self.pending_tokens
        logits, own, later = yield from self._catch_up(unseen, tokens, self.index.offers[-len(tokens):])
        mx.async_eval(later)  # the later layers' reading runs beside the first draft
        self.pending_hidden, self.pending_tokens = [], []  # read now
        self.before_chain = [keep_states([cache]) for cache in self.caches]
        out = Drafts()
        for j in range(k):
            if not take(out, logits[0], sampling, split, min_confidence, grammar):
                break
            if j < k - 1:
                logits, own = yield from self._chain(out.tokens, own, unseen[:, -1:])
        return finish(out, grammar)

    def _chain(self, drafts: list[int], own: mx.array, real: mx.array) -> Generator[DraftCall, tuple, tuple]:
        """The logits [1, V] of the next draft after `drafts` and what the chain goes on from. Layer
        j = len(drafts) reads its positions up to the last: layer j - 1's outputs (those waiting,
        then `own`: this chain's), the tokens after them known or drafted. Past the last layer it
        chains on its own output at the next position (`real`: the last real hidden input, for a
        trained drafter's block features)."""
        j = len(drafts)
        if j >= len(self.layers):
            layer = self.layers[-1]
            offers = None
            if layer.config.reads_offers:  # the lookup's offer after the drafts so far
                offers = offer_arrays(layer, [self.index.offer_after(tuple(drafts))])
            self.chained[-1] += 1
            return (yield DraftCall(layer, layer.chained(own[:, -1:], real), drafts[-1:], self.caches[-1], offers))
        if j == 1:  # the first layer's outputs up to the last position are all waiting already
            rows = self.lagging[1]
        else:
            rows = own if self.lagging[j] is None else mx.concatenate([self.lagging[j], own], axis=1)
        ids = self._after(self.read_upto[j] + j + 1, rows.shape[1], drafts)
        self.chained[j] += rows.shape[1]
        return (yield DraftCall(self.layers[j], rows, ids, self.caches[j]))

    def _catch_up(self, hidden: mx.array, tokens, offers) -> Generator[DraftCall, tuple, tuple]:
        """Reads (hidden [1, m, H], next token) pairs into the first layer's cache in chunks, with the
        lookup's offers beside the tokens if it reads them, and lets the later layers read what they
        can. Returns draft logits [1, V] and block output after the last pair, and the later layers'
        outputs."""
        first, later = self.layers[0], []
        for start in range(0, len(tokens), PREFILL_CHUNK):
            chunk = slice(start, start + PREFILL_CHUNK)
            logits, own = yield DraftCall(first, hidden[:, chunk], list(tokens[chunk]), self.caches[0],
                                          offer_arrays(first, offers[chunk]))
            later += self._feed(1, own)
        return logits, own, later

    def _feed(self, j: int, produced: mx.array) -> list:
        """Layer j - 1's new outputs reach layer j, which reads the positions whose token after next
        is known (position i needs t_{i+j+1}); the rest wait. Returns the outputs it computed."""
        if j == len(self.layers):
            return []
        rows = produced if self.lagging[j] is None else mx.concatenate([self.lagging[j], produced], axis=1)
        first = self.read_upto[j] + j + 1  # the token after next of the first row waiting
        usable = max(0, min(rows.shape[1], len(self.index.tokens) - first))
        self.lagging[j] = rows[:, usable:] if usable < rows.shape[1] else None
        if not usable:
            return []
        _, out = self.layers[j].features(rows[:, :usable], mx.array([self._after(first, usable)]), self.caches[j], self.model)
        self.read_upto[j] += usable
        return [out, *self._feed(j + 1, out)]

    def _after(self, start: int, n: int, drafts: list[int] | tuple = ()) -> list[int]:
        """The n tokens from position `start` on: the text's, then the drafts after it."""
        known = self.index.tokens[start : start + n]
        past = max(0, start - len(self.index.tokens))
        return known + list(drafts[past : past + n - len(known)])


def take(out: Drafts, row: mx.array, sampling: SamplingParams, split, min_confidence: float,
         grammar: Grammar | None, confidence: mx.array | None = None) -> bool:
    """One more draft from the drafter's logits [V] into `out`, masked by the grammar (which moves
    on by it); False, and `out.stopped`, when it is dropped: no token the grammar allows, or a
    confidence below the floor (`confidence`: a predicted acceptance, else the drafter's own
    probability of the draft)."""
    if grammar is not None:
        out.allowed.append(grammar.allowed())
        row = masked(row, out.allowed[-1])
        if not mx.isfinite(row).any().item():  # the drafter's head holds no token the grammar allows
            out.stopped = True
            return False
    if confidence is not None and confidence.item() < min_confidence:
        out.stopped = True
        return False
    d, q, own = _pick(row, sampling, split, min_confidence if confidence is None else 0.0)
    if own is not None and own.item() < min_confidence:
        out.stopped = True
        return False
    out.tokens.append(d.item())
    if grammar is not None:
        grammar.advance(out.tokens[-1:])
    if q is not None:
        out.q_rows.append(q)
    return True


def finish(out: Drafts, grammar: Grammar | None) -> Drafts:
    """The drafts, with the grammar's mask after the last one."""
    if grammar is not None and len(out.allowed) == len(out.tokens):
        out.allowed.append(grammar.allowed())
    return out


def _pick(row: mx.array, sampling: SamplingParams, split, min_confidence: float):
    """One draft from the drafter's logits [V]: (token [1], q [V] when sampling, its probability
    when a floor is set). A kept draft under a floor was drawn from q restricted to the tokens at or
    above it, renormalised: that is the q verification divides by."""
    if sampling.greedy:
        d = mx.argmax(row, keepdims=True)
        return d, None, mx.softmax(row, precise=True)[d] if min_confidence else None
    q_logprobs = target_logprobs(row, sampling)
    d = mx.random.categorical(q_logprobs, key=split()[0])[None]
    q = mx.exp(q_logprobs)
    if min_confidence:
        q = mx.where(q >= min_confidence, q, 0.0)
        q = q / q.sum()
    return d, q, mx.exp(q_logprobs[d]) if min_confidence else None

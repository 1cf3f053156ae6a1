"""The MTP drafter's side of one request, across its rounds.

The drafter reads (target hidden state h_i, next token t_{i+1}) pairs into its own KV cache, aligned
with the target's positions, and drafts t_{i+2}, then chains on its own block output. Pairs it has
not read yet wait here (`pending`): after a plain step or a copied (lookup) round it catches up on
them at its next draft; after a drafted round it drops its chained positions (`rewind`) and reads
the target's real hidden states of the accepted ones instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.models.cache import trim_prompt_cache

from daemon.drafting.lookup import NgramIndex
from daemon.engine.forward import PREFILL_CHUNK
from daemon.engine.grammar import Grammar, masked
from daemon.engine.rollback import keep_states, restore
from daemon.engine.sampling import SamplingParams, target_logprobs
from daemon.models.mtp import offer_arrays


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
        self.cache = drafter.make_cache()
        self.pending_hidden: list[mx.array] = []  # chunks [1, m_i, H]
        self.pending_tokens: list[int] = []
        self.chained = 0  # positions in the cache past the pairs: the last draft's chain
        self.before_chain = None  # a cache that cannot trim, as it was before that chain (daemon.engine.rollback)

    def start(self, prompt_hidden: mx.array, first_token: int) -> None:
        """Reads the prompt's pairs now (the index holds the prompt alone), as part of the prefill,
        so that no decoding round carries a prompt-long catch-up; the last one waits for the first
        token. prompt_hidden: [1, n, H]."""
        prompt = self.index.tokens
        if len(prompt) > 1:
            mx.eval(self._catch_up(prompt_hidden[:, :-1], prompt[1:], self.index.offers[1:])[1])
        self.pending_hidden, self.pending_tokens = [prompt_hidden[:, -1:]], [first_token]

    def read(self, hidden: mx.array, tokens: list[int]) -> None:
        """Pairs of a round the drafter did not draft: target hidden states [1, m, H], next tokens."""
        self.pending_hidden.append(hidden)
        self.pending_tokens.extend(tokens)

    def rewind(self, hidden: mx.array, tokens: list[int]) -> None:
        """After a drafted round: drop the chain; the target's hidden states [1, m, H] of the kept
        positions and the tokens after them are what it reads next."""
        if self.before_chain is None:
            trim_prompt_cache([self.cache], self.chained)
        else:
            restore([self.cache], self.before_chain)
        self.chained = 0
        self.pending_hidden, self.pending_tokens = [hidden], list(tokens)

    def draft(self, k: int, sampling: SamplingParams, split, min_confidence: float = 0.0,
              grammar: Grammar | None = None) -> Drafts:
        """Catches up on the pending pairs, then chains up to k drafts, stopping at the first it gives
        a probability below `min_confidence` (dropped). `split(n)`: fresh PRNG keys (sampling). A
        grammar masks every draft and moves on by the kept ones (the caller rolls it back)."""
        drafter = self.drafter
        unseen = mx.concatenate(self.pending_hidden, axis=1) if len(self.pending_hidden) > 1 else self.pending_hidden[0]
        tokens = self.pending_tokens
        logits, own = self._catch_up(unseen, tokens, self.index.offers[-len(tokens):])
        self.pending_hidden, self.pending_tokens = [], []  # read now
        self.before_chain = keep_states([self.cache])
        out = Drafts()
        for j in range(k):
            row = logits[0]
            if grammar is not None:
                out.allowed.append(grammar.allowed())
                row = masked(row, out.allowed[-1])
                if not mx.isfinite(row).any().item():  # the drafter's head holds no token the grammar allows
                    out.stopped = True
                    break
            d, q, confidence = _pick(row, sampling, split, min_confidence)
            if confidence is not None and confidence.item() < min_confidence:
                out.stopped = True
                break
            out.tokens.append(d.item())
            if grammar is not None:
                grammar.advance(out.tokens[-1:])
            if q is not None:
                out.q_rows.append(q)
            if j < k - 1:
                offers = None
                if drafter.config.reads_offers:  # the lookup's offer after the drafts so far
                    offers = offer_arrays(drafter, [self.index.offer_after(tuple(out.tokens))])
                logits, own = drafter.draft(drafter.chained(own[:, -1:], unseen[:, -1:]), d[None], self.cache, self.model, offers)
        self.chained = len(out.tokens) - (not out.stopped)  # a full chain never reads its last draft
        if grammar is not None and len(out.allowed) == len(out.tokens):
            out.allowed.append(grammar.allowed())
        return out

    def _catch_up(self, hidden: mx.array, tokens, offers) -> tuple[mx.array, mx.array]:
        """Reads (hidden [1, m, H], next token) pairs into the cache in chunks, with the lookup's
        offers beside the tokens if it reads them. Returns draft logits [1, V] and block output
        after the last pair."""
        for start in range(0, len(tokens), PREFILL_CHUNK):
            chunk = slice(start, start + PREFILL_CHUNK)
            logits, own = self.drafter.draft(
                hidden[:, chunk], mx.array([tokens[chunk]]), self.cache, self.model, offer_arrays(self.drafter, offers[chunk])
            )
        return logits, own


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

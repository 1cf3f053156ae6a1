"""Speculative decoding with an MTP drafter: draft k, verify k+1 in one target forward, accept.

Round, for the last emitted token t (not yet in the target's cache):
1. the drafter catches up on the (target hidden state, next token) pairs it has not seen, then
   chains k drafts on its own output;
2. the target runs [t, d_1..d_k] in one forward (k+1 rows);
3. greedy: accept the drafts its (tie-guarded) argmax agrees with, then emit its own token;
   sampling: rejection sampling with the residual max(0, p - q) (see daemon.engine.verify);
4. both caches are trimmed: the target keeps t and the accepted drafts, the drafter drops its
   chained positions and will recompute them from the target's real hidden states.
k comes from the policy every round; k = 0 is a plain target step. The policy may also name a
minimum confidence: the drafter stops at the first draft it gives a lower probability (its own q of
that token), which is dropped; dropped before the first, the round is a plain step. That decision
reads the drafter alone, never the target, so greedy output stays the target's; when sampling, a
kept draft was drawn from q restricted to the tokens at or above the floor, and that restricted,
renormalised q is what verification divides by, so sampling keeps the target's distribution
(dropped, the position is sampled from the target itself). The policy may instead take the
k drafts from a lookup's offer (the context, daemon.drafting.lookup, else the target's phrasebook,
daemon.drafting.phrases): then the drafter does not run, and it catches up on those positions in its next
round. Verification is the same for every source (a lookup draft is a drafter whose q is one-hot
on the copied token).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import mlx.core as mx
from mlx_lm.models.cache import trim_prompt_cache

from daemon.drafting.lookup import NgramIndex
from daemon.drafting.phrases import Phrasebook
from daemon.engine.forward import PREFILL_CHUNK, hidden_tap
from daemon.engine.records import Step
from daemon.engine.sampling import (
    SamplingParams,
    sample,
    target_logprobs,
    token_logprobs,
)
from daemon.engine.ties import NearTieGuard, greedy_with_margin
from daemon.engine.verify import greedy_accepted, residual_logprobs, sampled_accepted
from daemon.models.mtp import offer_arrays

LOOKUP_MAX = 8  # tokens a lookup (context or phrasebook) offers at most


def speculative_steps(
    model,
    drafter,
    cache,
    prompt_ids: tuple[int, ...],
    first_logits: mx.array,
    prompt_hidden: mx.array,
    sampling: SamplingParams,
    policy,
    guard: NearTieGuard,
    max_tokens: int,
    key: mx.array,
    verify_penalty: float = 0.0,
    logprobs: int | None = None,
    phrases: Phrasebook | None = None,
) -> Iterator[Step]:
    """prompt_hidden: [1, n, H] the target's hidden states over the prompt (drafter's source).
    verify_penalty: seconds added per extra verified row (a test switch that makes speculation
    lose); the policy is told every step's draft length, acceptance and time. `logprobs`: report
    each token's log-probability and the top n (None: no). `phrases`: the target's phrasebook,
    offered where the context has nothing to copy."""
    source = drafter.config.source
    tap = hidden_tap(model, source)
    dcache = drafter.make_cache()
    index = NgramIndex()  # also the text so far: index.tokens is the prompt and every emitted token
    index.extend(prompt_ids)

    def choose(logits: mx.array, ids: list[int]) -> int:
        """The target's own next token from logits [V] (greedy tie-guarded, or sampled)."""
        nonlocal key
        if sampling.greedy:
            token, margin = greedy_with_margin(logits)
            mx.eval(token, margin)
            return guard.token(ids, token.item(), margin.item())
        key, sub = mx.random.split(key)
        return sample(logits, sampling, sub).item()

    vocab = first_logits.shape[-1]
    # the drafter reads the prompt's pairs now, as part of the prefill (all but the last, which
    # needs the first token), so that no decoding round carries a prompt-long catch-up
    if len(prompt_ids) > 1:
        mx.eval(_catch_up(drafter, model, dcache, prompt_hidden[:, :-1], prompt_ids[1:], index.offers[1:])[1])  # cache only
    t = choose(first_logits[0], index.tokens)
    # pairs the drafter has not seen yet: hidden-state chunks [1, m_i, H] and the tokens after them
    pending_hidden, pending_tokens = [prompt_hidden[:, -1:]], [t]
    index.extend([t])
    yield Step((t,), logprobs=token_logprobs(first_logits, [t], logprobs))
    emitted = 1

    while True:
        room = max_tokens - emitted - 1
        limit = min(room, LOOKUP_MAX)
        offer = index.propose(limit)
        if not offer.tokens and phrases is not None:
            offer = phrases.propose(index.tokens, limit)
        plan = policy.plan(offer)
        k = min(plan.k, len(offer.tokens) if plan.lookup else room)
        started, stopped = time.perf_counter(), False
        if k > 0:
            # 1. draft: copy the lookup's offer, or let the drafter catch up on unseen pairs and
            #    then chain on its own output (stopping where its confidence falls)
            if plan.lookup:
                drafts = list(offer.tokens[:k])
                q_rows = [] if sampling.greedy else [mx.zeros(vocab).at[d].add(1.0) for d in drafts]
            else:
                drafts, q_rows, key, chained = _mtp_drafts(
                    drafter, model, dcache, pending_hidden, pending_tokens, k, sampling, key, index, plan.min_confidence
                )
                stopped = len(drafts) < k
                if not drafts:  # the drafter has read the pending pairs: none are left for it
                    pending_hidden, pending_tokens = [], []
            k = len(drafts)
        if k <= 0:
            logits = model(mx.array([[t]]), cache=cache)
            pending_hidden.append(tap.hidden(source))
            t = choose(logits[0, -1], index.tokens)
            pending_tokens.append(t)
            index.extend([t])
            emitted += 1
            policy.observe(0, 0, time.perf_counter() - started, stopped)
            yield Step((t,), logprobs=token_logprobs(logits[0], [t], logprobs))
            continue

        # 2. verify k+1 positions in one forward
        logits = model(mx.array([[t, *drafts]]), cache=cache)[0]
        hidden = tap.hidden(source)
        if verify_penalty:
            mx.eval(logits)
            time.sleep(verify_penalty * k)

        # 3. accept
        if sampling.greedy:
            target, margins = greedy_with_margin(logits)
            mx.eval(target, margins)
            draft_list, target, margins = drafts, target.tolist(), margins.tolist()
            out = []
            for i in range(k + 1):
                token = guard.token(index.tokens + out, target[i], margins[i])
                out.append(token)
                if i == k or draft_list[i] != token:
                    break
            accepted = greedy_accepted(draft_list, out)
        else:
            logp = target_logprobs(logits, sampling)
            q, draft_ids = mx.stack(q_rows), mx.array(drafts)
            rows = mx.arange(k)
            p_draft, q_draft = mx.exp(logp[rows, draft_ids]), q[rows, draft_ids]
            key, k_uniform, k_last = mx.random.split(key, 3)
            uniform = mx.random.uniform(shape=(k,), key=k_uniform)
            mx.eval(p_draft, q_draft, uniform)
            draft_list = drafts
            accepted = sampled_accepted(p_draft.tolist(), q_draft.tolist(), uniform.tolist())
            last = residual_logprobs(mx.exp(logp[accepted]), q[accepted]) if accepted < k else logp[k]
            out = draft_list[:accepted] + [mx.random.categorical(last, key=k_last).item()]

        # 4. trim: the target keeps t and the accepted drafts; the drafter drops its chain (after a
        #    lookup round it has seen nothing new and catches up later)
        trim_prompt_cache(cache, k - accepted)
        if plan.lookup:
            pending_hidden.append(hidden[:, : accepted + 1])
            pending_tokens.extend(out)
        else:
            trim_prompt_cache([dcache], chained)
            pending_hidden, pending_tokens = [hidden[:, : accepted + 1]], list(out)
        t = out[-1]
        index.extend(out)
        emitted += len(out)
        policy.observe(k, accepted, time.perf_counter() - started, stopped)
        yield Step(tuple(out), drafted=k, accepted=accepted, logprobs=token_logprobs(logits, out, logprobs), lookup=plan.lookup)


def _mtp_drafts(drafter, model, dcache, pending_hidden, pending_tokens, k, sampling, key, index: NgramIndex,
                min_confidence: float = 0.0):
    """The drafter catches up on the (hidden state, next token) pairs it has not seen, then chains
    up to k drafts on its own output, stopping at the first it gives a probability below
    `min_confidence` (dropped). Returns (the drafts, the drafter's probabilities per draft when
    sampling, the new random key, how many chained positions its cache holds beyond the pairs).
    The pending tokens are the last of `index.tokens`."""
    unseen = mx.concatenate(pending_hidden, axis=1) if len(pending_hidden) > 1 else pending_hidden[0]
    d_logits, own = _catch_up(drafter, model, dcache, unseen, pending_tokens, index.offers[-len(pending_tokens) :])
    drafts: list[int] = []
    q_rows = []
    for j in range(k):
        row = d_logits[0]
        if sampling.greedy:
            d = mx.argmax(row, keepdims=True)
            confidence = mx.softmax(row, precise=True)[d] if min_confidence else None
        else:
            key, sub = mx.random.split(key)
            q_logprobs = target_logprobs(row, sampling)
            d = mx.random.categorical(q_logprobs, key=sub)[None]
            confidence = mx.exp(q_logprobs[d]) if min_confidence else None
        if confidence is not None and confidence.item() < min_confidence:
            return drafts, q_rows, key, j
        drafts.append(d.item())
        if not sampling.greedy:
            q = mx.exp(q_logprobs)
            if min_confidence:  # what a kept draft was drawn from: q on the tokens at or above the floor
                q = mx.where(q >= min_confidence, q, 0.0)
                q = q / q.sum()
            q_rows.append(q)
        if j < k - 1:
            offers = offer_arrays(drafter, [index.offer_after(tuple(drafts))]) if drafter.config.reads_offers else None
            d_logits, own = drafter.draft(drafter.chained(own[:, -1:], unseen[:, -1:]), d[None], dcache, model, offers)
    return drafts, q_rows, key, k - 1


def _catch_up(drafter, model, dcache, hidden: mx.array, tokens, offers) -> tuple[mx.array, mx.array]:
    """The drafter reads (hidden state [1, m, H], next token) pairs into its cache, in chunks, with
    the lookup's offers beside the tokens if it reads them. Returns its draft logits [1, V] and
    block output after the last pair."""
    for start in range(0, len(tokens), PREFILL_CHUNK):
        chunk = slice(start, start + PREFILL_CHUNK)
        d_logits, own = drafter.draft(
            hidden[:, chunk], mx.array([tokens[chunk]]), dcache, model, offer_arrays(drafter, offers[chunk])
        )
    return d_logits, own

"""Speculative decoding: propose, draft, verify k+1 positions in one target forward, rewind.

A round, for the last emitted token t (not yet in the target's cache):
1. propose: the context lookup (daemon.drafting.lookup), else the target's phrasebook
   (daemon.drafting.phrases), offers a continuation to copy; the policy plans k and the source,
   and whoever runs the sequence may cut k (a batch: policies.batch);
2. draft: copy the offer, or let the MTP drafter (daemon.drafting.session) catch up and chain k
   drafts, or the block drafter (daemon.drafting.block_session) propose its block in one forward,
   stopping below the plan's confidence floor; no drafts: the round is a plain step;
3. verify: the target runs [t, d_1..d_k] as k+1 rows; greedy or sampled acceptance
   (daemon.engine.verify) keeps a prefix and adds the target's own next token;
4. rewind: the target's cache drops the rejected rows, the drafter its chain.
A copied draft is a drafter whose q is one-hot on the copied token, so verification is the same for
every source and sampling keeps the target's distribution.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import replace

import mlx.core as mx

from daemon.drafting.block_session import BlockSession
from daemon.drafting.lookup import NgramIndex
from daemon.drafting.phrases import Phrasebook
from daemon.drafting.session import DraftingSession, Drafts
from daemon.engine.forward import HiddenTap
from daemon.engine.grammar import masked
from daemon.engine.plain import Decoding, plain_step
from daemon.engine.records import Step
from daemon.engine.rollback import keep_states, take_back
from daemon.engine.rows import DraftCall, Forward, Planned
from daemon.engine.sampling import token_logprobs
from daemon.engine.verify import verify_greedy, verify_sampled
from policies.plan import DraftPolicy, Plan, Proposal

LOOKUP_MAX = 8  # tokens a lookup (context or phrasebook) offers at most


def propose(index: NgramIndex, phrases: Phrasebook | None, limit: int) -> Proposal:
    """What may be copied: the context's continuation, else the phrasebook's."""
    offer = index.propose(limit)
    if not offer.tokens and phrases is not None:
        offer = phrases.propose(index.tokens, limit)
    return offer


def draft(session: DraftingSession | BlockSession, plan: Plan, offer: Proposal,
          dec: Decoding) -> Generator[DraftCall, tuple, Drafts]:
    """The plan's k drafts (at most) from the planned source: a coroutine that asks for the
    drafter's forwards (daemon.engine.rows). A grammar has moved on by them: a copy is cut at its
    first token the grammar forbids (a copy is deterministic, so the cut keeps the distribution),
    the drafter is masked by it."""
    grammar = dec.chooser.grammar
    if not plan.lookup:
        return (yield from session.drafting(plan.k, dec.chooser.sampling, dec.chooser.split, plan.min_confidence, grammar))
    tokens = list(offer.tokens[: plan.k])
    allowed = []
    if grammar is not None:
        tokens = tokens[: grammar.valid_prefix(tokens)]
        allowed = [grammar.allowed()]
        for d in tokens:
            grammar.advance([d])
            allowed.append(grammar.allowed())
    q_rows = [] if dec.chooser.sampling.greedy else [mx.zeros(dec.vocab).at[d].add(1.0) for d in tokens]
    return Drafts(tokens, q_rows, allowed=allowed if tokens else [])


def verify(dec: Decoding, t: int, drafts: Drafts, history: list[int], tap: HiddenTap, source: str):
    """One target forward over [t, *drafts]: a coroutine (daemon.engine.rows) that returns (the
    tokens it emits, the Ran: logits [k+1, V] and hidden states [1, k+1, H], read before a
    near-tie recomputation can run the model again)."""
    ran = yield Forward([t, *drafts.tokens], dec.cache, "all", tap, source, len(drafts.tokens))
    logits = dec.chooser.adjust_rows(ran.logits, history, drafts.tokens)
    allowed = mx.stack(drafts.allowed) if drafts.allowed else None
    if allowed is not None:
        logits = masked(logits, allowed)
    if dec.chooser.sampling.greedy:
        return verify_greedy(logits, drafts.tokens, dec.chooser.guard, history, allowed, dec.chooser.adjust), ran
    keys = dec.chooser.split(2)
    return verify_sampled(logits, drafts.tokens, drafts.q_rows, dec.chooser.sampling, keys), ran


def speculative_steps(
    dec: Decoding,
    session: DraftingSession | BlockSession,
    tap: HiddenTap,
    policy: DraftPolicy,
    content_class: Callable[[], str],
    max_tokens: int,
    first_logits: mx.array,
    prompt_hidden: mx.array,
    phrases: Phrasebook | None = None,
    verify_penalty: float = 0.0,
) -> Generator:
    """first_logits [1, V] and prompt_hidden [1, n, H]: the prompt's last logits and the target's
    hidden states over it (the drafter's source). The policy plans every round from the lookup's
    offer and `content_class()`, and is told each round's draft length, acceptance and time
    (with `verify_penalty` seconds counted per verified draft: see daemon.engine.generate)."""
    index, source = session.index, session.drafter.config.source
    t = dec.chooser.choose(first_logits, index.tokens)
    session.start(prompt_hidden, t)
    index.extend([t])
    yield Step((t,), logprobs=token_logprobs(first_logits, [t], dec.logprobs))
    emitted = 1
    while True:
        started = time.perf_counter()
        room = max_tokens - emitted - 1
        offer = propose(index, phrases, min(room, LOOKUP_MAX))
        plan = policy.plan(offer, content_class())
        plan = replace(plan, k=min(plan.k, room))  # no more drafts than the answer has room for
        if plan.k > 0:  # whoever runs the sequence may cut the draft (a batch's rows)
            plan = replace(plan, k=(yield Planned(plan)))
        drafts = (yield from draft(session, plan, offer, dec)) if plan.k > 0 else Drafts()
        k = len(drafts.tokens)
        if k == 0:
            t, ran = yield from plain_step(dec, t, index.tokens, tap, source)
            session.read(ran.hidden, [t])
            out, accepted = [t], 0
        else:
            accepted = -1  # verification failed: the whole round goes
            states = keep_states(dec.cache)
            try:
                out, ran = yield from verify(dec, t, drafts, index.tokens, tap, source)
                accepted = len(out) - 1
            finally:  # the target keeps t and the accepted drafts; a grammar forgets the rejected ones
                take_back(dec.model, dec.cache, states, [t, *drafts.tokens], accepted + 1)
                if dec.chooser.grammar is not None:
                    dec.chooser.grammar.rollback(k - max(accepted, 0))
            if dec.chooser.grammar is not None:
                dec.chooser.grammar.advance(out[accepted:])
            hidden = ran.hidden[:, : accepted + 1]
            if plan.lookup:  # the drafter has not seen these positions: it reads them next round
                session.read(hidden, out)
            else:
                session.rewind(hidden, out)
            t = out[-1]
        index.extend(out)
        emitted += len(out)
        seconds = time.perf_counter() - started + verify_penalty * k
        policy.observe(k, accepted, seconds if ran.alone else 0.0, drafts.stopped)  # a batch's time is not the sequence's
        yield Step(tuple(out), k, accepted, token_logprobs(ran.logits, out, dec.logprobs), plan.lookup and k > 0,
                   seconds, plan.expected_speedup if k else None)

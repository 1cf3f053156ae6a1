"""The generation engine: prompt token ids in, a stream of typed records out.

It knows nothing of HTTP or chat formats and must run on the one thread that owns MLX. A stepper
(daemon.engine.plain or daemon.engine.speculative) produces the tokens of each decoding step;
`sequence` turns them into text, ends the answer (daemon.engine.stops), keeps the one content
classifier of the request and counts every step in its stats record (daemon.engine.records).
A sequence is a coroutine that asks for its target forwards (daemon.engine.rows): `generate` runs
one by itself, the scheduler (daemon.engine.batch) many together.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from dataclasses import replace

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from daemon.drafting.block_session import BlockSession
from daemon.drafting.lookup import NgramIndex
from daemon.drafting.session import DraftingSession
from daemon.engine.choose import TokenChooser
from daemon.engine.forward import PREFILL_CHUNK, Chunk, extend_rows, hidden_tap, prefill_rows
from daemon.engine.grammar import Grammar
from daemon.engine.plain import Decoding, plain_steps
from daemon.engine.prompt_cache import PromptCache, pauses, recurrent_states, snapshot
from daemon.engine.records import Delta, Finished, Request, SpecStats, Step
from daemon.engine.rows import alone
from daemon.engine.sampling import new_key
from daemon.engine.speculative import speculative_steps
from daemon.engine.stops import Output
from daemon.engine.ties import DEFAULT_MARGIN_FP32, DEFAULT_MARGIN_HALF, NearTieGuard
from daemon.models.block import is_block
from daemon.models.loading import LoadedModel
from policies.classifier import ContentTracker
from policies.fixed import Fixed
from policies.plan import DraftPolicy

PROMPT_CONTEXT = 64  # prompt tokens the content classifier reads
CLOSE_WITHIN = 48  # under a grammar, the answer's last positions checked for room to complete it
CLOSE_SLACK = 2  # tokens to spare there: a completion can grow by more than one per position


def default_margin(lm: LoadedModel) -> float:
    return DEFAULT_MARGIN_HALF if lm.quantized else DEFAULT_MARGIN_FP32


def _prefill(lm: LoadedModel, request: Request, prompt_cache: PromptCache | None, chunk: Chunk, batched: bool):
    """Fills a cache with the prompt, starting from the longest prefix the prompt cache holds: a
    coroutine (daemon.engine.rows). Returns (cache, last logits [1, V], hidden states over the
    prompt or None, cached tokens). The hidden states the drafter reads are kept whenever there is
    a drafter. The prefill pauses where the prompt cache keeps the cache on the way (`pauses`)."""
    model, ids = lm.model, request.prompt_ids
    source = lm.drafter.config.source if lm.drafter is not None else None
    cache = make_prompt_cache(model)
    reuse = prompt_cache.lookup(ids, source, cache) if prompt_cache is not None else None
    cached = reuse.length if reuse else 0
    chunks = [reuse.hidden] if reuse and reuse.hidden is not None else []
    tap = hidden_tap(model, source) if source is not None else None

    def hidden():
        return mx.concatenate(chunks, axis=1) if chunks else None

    start, states = cached, {}
    marks = pauses(cache, request.marks, request.persist_prefix, cached, len(ids)) if prompt_cache is not None else []
    for mark in marks:
        chunks += (yield from extend_rows(cache, ids[start:mark], tap, source, chunk))[0]
        start, states[mark] = mark, recurrent_states(cache)
        if mark == request.persist_prefix:
            prompt_cache.store(snapshot(ids[:mark], cache, hidden(), source), persist=True)
    logits, more = yield from prefill_rows(cache, ids[start:], tap, source, chunk, last_alone=not batched)
    chunks += more
    prompt_hidden = hidden()
    if prompt_cache is not None:
        prompt_cache.store(snapshot(ids, cache, prompt_hidden, source, states))
    return cache, logits, prompt_hidden, cached


def closed(step: Step, grammar: Grammar, room: int, eos: set[int]) -> tuple[Step, bool]:
    """`step` as the answer's room allows under a grammar: at the first of its positions where what
    is left of the room is barely enough to complete the grammar (CLOSE_SLACK tokens to spare),
    its tokens up to there and the completion, and True (the answer ends there: a forced call or a
    schema ends valid, cut, with finish_reason "length"). Only the answer's last CLOSE_WITHIN
    positions are looked at; token positions alone decide, so every draft policy closes alike."""
    n = len(step.tokens)
    if room - n > CLOSE_WITHIN:
        return step, False
    grammar.rollback(n)
    for i, token in enumerate(step.tokens, 1):
        grammar.advance([token])
        left = room - i
        if token in eos or left > CLOSE_WITHIN:
            continue
        walk = grammar.closing(left)
        if walk is not None and len(walk) + CLOSE_SLACK >= left:
            grammar.advance(walk)
            return replace(step, tokens=(*step.tokens[:i], *walk), logprobs=step.logprobs[:i]), True
    return step, False


def generate(lm: LoadedModel, request: Request, policy: DraftPolicy | None = None, tie_margin: float | None = None,
             verify_penalty: float = 0.0, prompt_cache: PromptCache | None = None) -> Iterator[Delta | Finished]:
    """One request by itself: its records. The arguments are `sequence`'s."""
    return alone(lm.model, sequence(lm, request, policy, tie_margin, verify_penalty, prompt_cache))


def sequence(
    lm: LoadedModel,
    request: Request,
    policy: DraftPolicy | None = None,
    tie_margin: float | None = None,
    verify_penalty: float = 0.0,
    prompt_cache: PromptCache | None = None,
    chunk: Chunk = PREFILL_CHUNK,
    batched: bool = False,
) -> Generator:
    """One request as a coroutine (daemon.engine.rows): it yields Forwards and Planned drafts for
    whoever runs it, and its records. `policy`: None or `off` decodes plainly, and so does any
    policy when the model has no drafter. `verify_penalty`: seconds counted for each verified
    draft, in the steps' times and the decode time, without waiting (a switch that simulates a
    machine where verification rows are dear, so speculation must lose). `prompt_cache`: reuse and
    remember prompt prefixes. `chunk`: prefill rows per forward (or a function asked before each).
    `batched`: run beside others."""
    policy = policy or Fixed(0)
    start = time.perf_counter()
    guard = NearTieGuard(lm.model, default_margin(lm) if tie_margin is None else tie_margin)
    grammar = Grammar(lm.tokenizer, request.grammar, lm.config["vocab_size"]) if request.grammar else None
    cache, logits, prompt_hidden, cached = yield from _prefill(lm, request, prompt_cache, chunk, batched)
    chooser = TokenChooser(request.sampling, new_key(request.sampling.seed), guard, grammar)
    dec = Decoding(lm.model, cache, chooser, logits.shape[-1], request.logprobs)
    tracker = ContentTracker(lm.tokenizer.decode(list(request.prompt_ids[-PROMPT_CONTEXT:])), request.grammar is not None)
    if lm.drafter is not None and policy.name != "off":
        index = NgramIndex()
        index.extend(request.prompt_ids)
        session = (BlockSession if is_block(lm.drafter) else DraftingSession)(lm.drafter, lm.model, index)
        tap = hidden_tap(lm.model, lm.drafter.config.source)
        steps = speculative_steps(dec, session, tap, policy, lambda: tracker.current, request.max_tokens, logits,
                                  prompt_hidden, lm.phrases, verify_penalty)
    else:
        steps = plain_steps(dec, request.prompt_ids, logits, batched)
    output, stats = Output(lm.tokenizer, request.stop, request.max_tokens), SpecStats()
    first_token_at, reply, first_tokens = None, None, 0
    try:
        while True:
            step = steps.send(reply)
            if not isinstance(step, Step):  # asked of whoever runs the sequence
                reply = yield step
                continue
            reply = None
            first_token_at = first_token_at or time.perf_counter()
            closing = False
            if grammar is not None:
                step, closing = closed(step, grammar, request.max_tokens - len(output.token_ids), output.eos)
            stats.observe_step(step, tracker.current)
            delta = output.take(step, last=closing)
            first_tokens = first_tokens or len(output.token_ids)
            tracker.feed(delta.text)
            yield delta
            if output.finish:
                break
    finally:
        steps.close()
    end = time.perf_counter()
    stats.tie_rechecks = guard.rechecks
    yield Finished(
        finish_reason=output.finish,
        prompt_tokens=len(request.prompt_ids),
        completion_tokens=len(output.token_ids),
        cached_tokens=cached,
        ttft_seconds=(first_token_at or end) - start,
        decode_seconds=end - (first_token_at or end) + verify_penalty * stats.drafted,
        stats=stats,
        token_ids=tuple(output.token_ids),
        stop_sequence=output.stops.hit,
        first_tokens=max(first_tokens, 1),
    )

"""The generation engine: prompt token ids in, a stream of typed records out.

It knows nothing of HTTP or chat formats and must run on the one thread that owns MLX.
A *stepper* produces the tokens of one decoding step (one token for plain decoding, up to
k+1 with speculation); `generate` turns steps into text, applies EOS, stop strings and
max_tokens, and counts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from daemon.engine.forward import extend, hidden_tap, prefill
from daemon.engine.prompt_cache import PromptCache, snapshot
from daemon.engine.records import Delta, Finished, Request, Step
from daemon.engine.sampling import SamplingParams, new_key, sample, token_logprobs
from daemon.engine.speculative import speculative_steps
from daemon.engine.stops import StopText
from daemon.engine.ties import (
    DEFAULT_MARGIN_FP32,
    DEFAULT_MARGIN_HALF,
    NearTieGuard,
    greedy_with_margin,
)
from daemon.models.loading import LoadedModel, on_metal
from policies.fixed import Fixed

__all__ = ["generate"]

PROMPT_CONTEXT = 64  # prompt tokens the content classifier reads


def plain_steps(
    model, cache, prompt_ids, logits: mx.array, sampling: SamplingParams, guard, key, logprobs: int | None = None
) -> Iterator[Step]:
    """One token per step. Greedy tokens go through the near-tie guard, so they equal speculative
    decoding's. On Metal the next forward is queued before the current token is read (one host sync
    per token, overlapped with GPU compute), as in mlx-lm's generate_step; on a CPU a queued forward
    only competes with the current one for the cores (plain decoding measured 7% slower that way on
    the 2-core CI machine), so there each token is read, checked and yielded before the next forward
    is built."""
    steps = _queued_steps if on_metal() else _eager_steps
    return steps(model, cache, list(prompt_ids), logits, _drawer(sampling, key), guard, logprobs)


def _drawer(sampling: SamplingParams, key):
    """logits [1, V] -> (token [1], greedy margin or None); sampling splits its own key."""

    def draw(logits):
        nonlocal key
        if sampling.greedy:
            return greedy_with_margin(logits)
        key, sub = mx.random.split(key)
        return sample(logits, sampling, sub), None

    return draw


def _read(y: mx.array, margin, guard, history: list[int]) -> tuple[int, int]:
    """(the drawn token, the token to emit): greedy tokens go through the near-tie guard."""
    token = y.item()
    return token, token if margin is None else guard.token(history, token, margin.item())


def _eager_steps(model, cache, history, logits, draw, guard, logprobs) -> Iterator[Step]:
    while True:
        y, margin = draw(logits)
        mx.eval(y, margin)
        _, token = _read(y, margin, guard, history)
        history.append(token)
        yield Step((token,), logprobs=token_logprobs(logits, [token], logprobs))
        logits = model(mx.array([[token]]), cache=cache)[:, -1, :]


def _queued_steps(model, cache, history, logits, draw, guard, logprobs) -> Iterator[Step]:
    y, margin = draw(logits)
    mx.async_eval(y, margin)
    while True:
        next_logits = model(y[:, None], cache=cache)[:, -1, :]
        next_y, next_margin = draw(next_logits)
        mx.async_eval(next_y, next_margin)
        token, checked = _read(y, margin, guard, history)
        if checked != token:  # the queued step read the wrong token: redo it
            token, y = checked, mx.array([checked])
            trim_prompt_cache(cache, 1)
            next_logits = model(y[:, None], cache=cache)[:, -1, :]
            next_y, next_margin = draw(next_logits)
            mx.async_eval(next_y, next_margin)
        history.append(token)
        yield Step((token,), logprobs=token_logprobs(logits, [token], logprobs))
        logits, y, margin = next_logits, next_y, next_margin


def _final_text(detokenizer, stops: StopText) -> str:
    """Text still held by the detokenizer (partial UTF-8) and by the stop matcher, at the end."""
    detokenizer.finalize()
    piece, stopped = stops.feed(detokenizer.last_segment)
    return piece if stopped else piece + stops.flush()


def default_margin(lm: LoadedModel) -> float:
    return DEFAULT_MARGIN_HALF if lm.quantized else DEFAULT_MARGIN_FP32


def _prefill(lm: LoadedModel, request: Request, prompt_cache: PromptCache | None):
    """Fills a cache with the prompt, starting from the longest prefix the prompt cache holds.
    Returns (cache, last logits [1, V], hidden states over the prompt or None, cached tokens).
    The hidden states the drafter reads are kept whenever there is a drafter."""
    model, ids = lm.model, request.prompt_ids
    source = lm.drafter.config.source if lm.drafter is not None else None
    reuse = prompt_cache.lookup(ids, source) if prompt_cache is not None else None
    cache = reuse.cache if reuse else make_prompt_cache(model)
    cached = reuse.length if reuse else 0
    chunks = [reuse.hidden] if reuse and reuse.hidden is not None else []
    tap = hidden_tap(model, source) if source is not None else None

    def on_chunk():
        if tap is not None:
            chunks.append(tap.hidden(source))

    def hidden():
        return mx.concatenate(chunks, axis=1) if chunks else None

    start = cached
    if prompt_cache is not None and cached < request.persist_prefix < len(ids):
        extend(model, cache, ids[cached : request.persist_prefix], on_chunk)
        start = request.persist_prefix
        prompt_cache.store(snapshot(ids[:start], cache, hidden(), source), persist=True)
    logits = prefill(model, cache, ids[start:], on_chunk)
    prompt_hidden = hidden()
    if prompt_cache is not None:
        prompt_cache.store(snapshot(ids, cache, prompt_hidden, source))
    return cache, logits, prompt_hidden, cached


def generate(
    lm: LoadedModel,
    request: Request,
    policy=None,
    tie_margin: float | None = None,
    verify_penalty: float = 0.0,
    prompt_cache: PromptCache | None = None,
) -> Iterator[Delta | Finished]:
    """`policy`: a draft policy (policies/); None or `off` decodes plainly, and so does any policy
    when the model has no drafter. `prompt_cache`: reuse and remember prompt prefixes."""
    policy = policy or Fixed(0)
    start = time.perf_counter()
    model = lm.model
    guard = NearTieGuard(model, default_margin(lm) if tie_margin is None else tie_margin)
    key = new_key(request.sampling.seed)
    cache, logits, prompt_hidden, cached = _prefill(lm, request, prompt_cache)
    speculate = lm.drafter is not None and policy.name != "off"
    if speculate:
        steps = speculative_steps(
            model, lm.drafter, cache, request.prompt_ids, logits, prompt_hidden,
            request.sampling, policy, guard, request.max_tokens, key, verify_penalty, request.logprobs,
            lm.phrases,
        )
        policy.observe_text(lm.tokenizer.decode(list(request.prompt_ids[-PROMPT_CONTEXT:])))
    else:
        steps = plain_steps(model, cache, request.prompt_ids, logits, request.sampling, guard, key, request.logprobs)

    detokenizer = lm.tokenizer.detokenizer
    eos = set(lm.tokenizer.eos_token_ids)
    stops = StopText(request.stop)
    generated: list[int] = []
    lengths: list[int] = []
    copied: list[bool] = []
    lookup = [0, 0]  # drafted, accepted
    drafted_at: list[int] = []
    accepted_at: list[int] = []
    first_token_at = None
    finish = None
    try:
        for step in steps:
            first_token_at = first_token_at or time.perf_counter()
            if speculate:
                lengths.append(step.drafted)
                copied.append(step.lookup)
            if step.lookup:
                lookup[0] += step.drafted
                lookup[1] += step.accepted
            if step.drafted:
                for counts, n in ((drafted_at, step.drafted), (accepted_at, step.accepted)):
                    counts.extend([0] * (step.drafted - len(counts)))
                    for j in range(n):
                        counts[j] += 1
            kept, text, stopped = [], [], False
            for token in step.tokens:
                if token in eos:
                    finish = "stop"
                    break
                kept.append(token)
                detokenizer.add_token(token)
                piece, stopped = stops.feed(detokenizer.last_segment)
                text.append(piece)
                if stopped:
                    finish = "stop"
                    break
                if len(generated) + len(kept) >= request.max_tokens:
                    finish = "length"
                    break
            generated.extend(kept)
            if finish and not stopped:
                text.append(_final_text(detokenizer, stops))
            delta = Delta(tuple(kept), "".join(text), step.logprobs[: len(kept)])
            policy.observe_text(delta.text)
            yield delta
            if finish:
                break
    finally:
        steps.close()
    end = time.perf_counter()
    yield Finished(
        finish_reason=finish,
        prompt_tokens=len(request.prompt_ids),
        completion_tokens=len(generated),
        cached_tokens=cached,
        ttft_seconds=(first_token_at or end) - start,
        decode_seconds=end - (first_token_at or end),
        drafted=sum(drafted_at),
        accepted=sum(accepted_at),
        drafted_by_position=tuple(drafted_at),
        accepted_by_position=tuple(accepted_at),
        lookup_drafted=lookup[0],
        lookup_accepted=lookup[1],
        draft_lengths=tuple(lengths),
        lookup_steps=tuple(copied),
        tie_rechecks=guard.rechecks,
        token_ids=tuple(generated),
    )

"""The generation engine: prompt token ids in, a stream of typed records out.

It knows nothing of HTTP or chat formats and must run on the one thread that owns MLX.
A *stepper* produces the tokens of one decoding step (one token for plain decoding, up to
k+1 with speculation); `generate` turns steps into text, applies EOS, stop strings and
max_tokens, and counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from daemon.models import LoadedModel
from daemon.sampling import SamplingParams, new_key, sample
from daemon.stops import StopText

PREFILL_CHUNK = 512


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    max_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError("the prompt is empty")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")


@dataclass(frozen=True)
class Step:
    """What one decoding step produced: token ids, and how many were drafted / accepted."""

    tokens: tuple[int, ...]
    drafted: int = 0
    accepted: int = 0


@dataclass(frozen=True)
class Delta:
    """New output of one step: the token ids kept and the text they add."""

    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    prompt_tokens: int
    completion_tokens: int
    ttft_seconds: float  # request start -> first token
    decode_seconds: float  # first token -> last token
    drafted: int = 0
    accepted: int = 0
    token_ids: tuple[int, ...] = field(default=(), repr=False)

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first over the time after the first."""
        if self.decode_seconds <= 0 or self.completion_tokens < 2:
            return 0.0
        return (self.completion_tokens - 1) / self.decode_seconds


def prefill(model, cache, prompt_ids: tuple[int, ...]) -> mx.array:
    """Run the prompt through the model, filling `cache`. Returns the last position's logits [1, V]."""
    ids = mx.array(prompt_ids)
    for start in range(0, len(prompt_ids) - 1, PREFILL_CHUNK):
        model(ids[None, start : min(start + PREFILL_CHUNK, len(prompt_ids) - 1)], cache=cache)
        mx.eval([c.state for c in cache])
    return model(ids[None, -1:], cache=cache)[:, -1, :]


def plain_steps(model, cache, logits: mx.array, sampling: SamplingParams) -> Iterator[Step]:
    """One token per step. The next forward is queued before the current token is read (one host
    sync per token, overlapped with compute), as in mlx-lm's generate_step."""
    key = new_key(sampling.seed)

    def draw(logits):
        nonlocal key
        if sampling.greedy:
            return mx.argmax(logits, axis=-1)
        key, sub = mx.random.split(key)
        return sample(logits, sampling, sub)

    y = draw(logits)
    mx.async_eval(y)
    while True:
        next_y = draw(model(y[:, None], cache=cache)[:, -1, :])
        mx.async_eval(next_y)
        yield Step((y.item(),))
        y = next_y


def _final_text(detokenizer, stops: StopText) -> str:
    """Text still held by the detokenizer (partial UTF-8) and by the stop matcher, at the end."""
    detokenizer.finalize()
    piece, stopped = stops.feed(detokenizer.last_segment)
    return piece if stopped else piece + stops.flush()


def generate(lm: LoadedModel, request: Request) -> Iterator[Delta | Finished]:
    start = time.perf_counter()
    cache = make_prompt_cache(lm.model)
    steps = plain_steps(lm.model, cache, prefill(lm.model, cache, request.prompt_ids), request.sampling)
    detokenizer = lm.tokenizer.detokenizer
    eos = set(lm.tokenizer.eos_token_ids)
    stops = StopText(request.stop)
    generated: list[int] = []
    drafted = accepted = 0
    first_token_at = None
    finish = None
    try:
        for step in steps:
            first_token_at = first_token_at or time.perf_counter()
            drafted += step.drafted
            accepted += step.accepted
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
            yield Delta(tuple(kept), "".join(text))
            if finish:
                break
    finally:
        steps.close()
    end = time.perf_counter()
    yield Finished(
        finish_reason=finish,
        prompt_tokens=len(request.prompt_ids),
        completion_tokens=len(generated),
        ttft_seconds=(first_token_at or end) - start,
        decode_seconds=end - (first_token_at or end),
        drafted=drafted,
        accepted=accepted,
        token_ids=tuple(generated),
    )

"""The typed records the engine takes and yields."""

from __future__ import annotations

from dataclasses import dataclass, field

from daemon.engine.sampling import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    max_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; n >= 0: each token's log-probability and the top n
    persist_prefix: int = 0  # leading prompt tokens to keep in the on-disk prompt cache (a system prompt)

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
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the request asks for them
    lookup: bool = False  # the drafts were copied from the context, not drafted by the MTP drafter


@dataclass(frozen=True)
class Delta:
    """New output of one step: the token ids kept and the text they add."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # one per kept token, when the request asks for them


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens taken from the prompt cache
    ttft_seconds: float  # request start -> first token
    decode_seconds: float  # first token -> last token
    drafted: int = 0
    accepted: int = 0
    drafted_by_position: tuple[int, ...] = ()  # [j]: drafts made at draft position j+1
    accepted_by_position: tuple[int, ...] = ()  # [j]: of those, accepted
    lookup_drafted: int = 0  # of `drafted`, the tokens copied by lookup (context or phrasebook)
    lookup_accepted: int = 0  # of `accepted`, the copied ones
    draft_lengths: tuple[int, ...] = field(default=(), repr=False)  # k at each step (speculative runs)
    lookup_steps: tuple[bool, ...] = field(default=(), repr=False)  # at each step: drafts copied by lookup
    tie_rechecks: int = 0  # near-tie positions decided by canonical recomputation
    token_ids: tuple[int, ...] = field(default=(), repr=False)

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first over the time after the first."""
        if self.decode_seconds <= 0 or self.completion_tokens < 2:
            return 0.0
        return (self.completion_tokens - 1) / self.decode_seconds

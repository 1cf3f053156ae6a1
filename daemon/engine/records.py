"""The typed records the engine takes and yields, and `SpecStats`: the one place drafts are counted.

The engine observes every step once (`SpecStats.observe_step`); `Finished` carries the record;
metrics, `/health`, the request log, the API's `mtpd` object and `mtpd bench` all read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from daemon.engine.sampling import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; n >= 0: each token's log-probability and the top n
    persist_prefix: int = 0  # leading prompt tokens to keep in the on-disk prompt cache (a system prompt)
    grammar: str | None = None  # an llguidance grammar the answer must follow (daemon.engine.grammar)
    marks: tuple[int, ...] = ()  # prompt lengths a next turn of the conversation shares (daemon.engine.prompt_cache)

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
    lookup: bool = False  # the drafts were copied by a lookup, not drafted by the MTP drafter
    seconds: float = 0.0  # the step's time (0: not timed)
    expected_speedup: float | None = None  # what the policy's cost model expected of its plan


@dataclass(frozen=True)
class Delta:
    """New output of one step: the token ids kept and the text they add, and the step's round."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # one per kept token, when the request asks for them
    pieces: tuple[str, ...] = ()  # each kept token's text, as released (their join is `text`, or its start)
    drafted: int = 0  # the round's drafts, verified
    accepted: int = 0  # of them, accepted: the step's first `accepted` tokens
    lookup: bool = False  # the drafts were copied by a lookup


ORIGINS = ("target", "draft", "lookup")  # the target's own step, an accepted drafter token, an accepted copy


def origins(delta: Delta) -> tuple[str, ...]:
    """Where each kept token came from: the step's accepted drafts first, then the target's token."""
    copied = "lookup" if delta.lookup else "draft"
    return tuple(copied if i < delta.accepted else "target" for i in range(len(delta.token_ids)))


SOURCES = ("mtp", "lookup")  # the MTP drafter, or copied by lookup (the context or the phrasebook)


@dataclass
class SpecStats:
    drafted_by_position: list[int] = field(default_factory=list)  # [j]: drafts made at draft position j+1
    accepted_by_position: list[int] = field(default_factory=list)  # [j]: of those, accepted
    # (content class, source) -> [speculative steps, drafted tokens, accepted tokens]
    by_kind: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    draft_lengths: list[int] = field(default_factory=list)  # k at each step (0: a plain step)
    lookup_steps: list[bool] = field(default_factory=list)  # at each step: drafts copied by lookup
    step_seconds: list[float] = field(default_factory=list)  # each step's time (0: not timed)
    expected_speedups: list[float] = field(default_factory=list)  # the policy's E(k)/T(k) over 1/T(0), where given
    tie_rechecks: int = 0  # near-tie positions decided by canonical recomputation

    def observe_step(self, step: Step, content_class: str) -> None:
        self.draft_lengths.append(step.drafted)
        self.lookup_steps.append(step.lookup)
        self.step_seconds.append(step.seconds)
        if step.expected_speedup is not None:
            self.expected_speedups.append(step.expected_speedup)
        if step.drafted:
            self.observe_draft(step.drafted, step.accepted, content_class, "lookup" if step.lookup else "mtp")

    def observe_draft(self, drafted: int, accepted: int, content_class: str, source: str) -> None:
        """One verified draft of `drafted` tokens, the first `accepted` of them kept."""
        for counts, n in ((self.drafted_by_position, drafted), (self.accepted_by_position, accepted)):
            counts.extend([0] * (drafted - len(counts)))
            for j in range(n):
                counts[j] += 1
        totals = self.by_kind.setdefault((content_class, source), [0, 0, 0])
        totals[0] += 1
        totals[1] += drafted
        totals[2] += accepted

    def merge(self, other: SpecStats) -> None:
        """Adds `other`'s draft counts (by position and by kind) to these: totals over requests."""
        for counts, more in ((self.drafted_by_position, other.drafted_by_position),
                             (self.accepted_by_position, other.accepted_by_position)):
            counts.extend([0] * (len(more) - len(counts)))
            for j, n in enumerate(more):
                counts[j] += n
        for key, values in other.by_kind.items():
            totals = self.by_kind.setdefault(key, [0, 0, 0])
            for i, n in enumerate(values):
                totals[i] += n

    @property
    def drafted(self) -> int:
        return sum(self.drafted_by_position)

    @property
    def accepted(self) -> int:
        return sum(self.accepted_by_position)

    def _source(self, source: str, i: int) -> int:
        return sum(v[i] for (_, s), v in self.by_kind.items() if s == source)

    @property
    def lookup_drafted(self) -> int:
        return self._source("lookup", 1)

    @property
    def lookup_accepted(self) -> int:
        return self._source("lookup", 2)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def speculative_rate(self) -> float | None:
        """Tokens per second over the steps that drafted (each also emits one of the target's own)."""
        seconds = sum(s for k, s in zip(self.draft_lengths, self.step_seconds) if k)
        steps = sum(1 for k in self.draft_lengths if k)
        return (self.accepted + steps) / seconds if seconds > 0 else None

    def summary(self) -> dict:
        """The counts as plain JSON (bench results, the request log)."""
        return {
            "drafted": self.drafted, "accepted": self.accepted,
            "drafted_by_position": self.drafted_by_position, "accepted_by_position": self.accepted_by_position,
            "lookup_drafted": self.lookup_drafted, "lookup_accepted": self.lookup_accepted,
            "by_class": self.by_class(), "tie_rechecks": self.tie_rechecks,
        }

    def by_class(self) -> dict[str, list[int]]:
        """Content class -> [drafted, accepted], both sources together."""
        out: dict[str, list[int]] = {}
        for (klass, _), (_, drafted, accepted) in self.by_kind.items():
            totals = out.setdefault(klass, [0, 0])
            totals[0] += drafted
            totals[1] += accepted
        return out


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens taken from the prompt cache
    ttft_seconds: float  # request start -> first token
    decode_seconds: float  # first token -> last token
    stats: SpecStats = field(default_factory=SpecStats, repr=False)
    token_ids: tuple[int, ...] = field(default=(), repr=False)
    stop_sequence: str | None = None  # the stop string that ended the answer, if one did
    first_tokens: int = 1  # tokens the first step gave (drafts accepted with it come at once)

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: the tokens after the first step over the time after it (0: one step gave all)."""
        later = self.completion_tokens - self.first_tokens
        if self.decode_seconds <= 0 or later < 1:
            return 0.0
        return later / self.decode_seconds

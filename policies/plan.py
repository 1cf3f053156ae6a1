"""What a draft policy is offered and decides each step, and the interface every policy has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Proposal:
    """Tokens a lookup offers to copy as drafts (daemon.drafting.lookup, daemon.drafting.phrases)."""

    tokens: tuple[int, ...] = ()
    match: int = 0  # length of the n-gram the offer continues (0: none)
    source: str = "context"  # "context": the prompt and answer so far; "phrases": the target's phrasebook


NO_OFFER = Proposal()


@dataclass(frozen=True)
class Plan:
    k: int = 0  # tokens to draft (0: a plain decode step)
    lookup: bool = False  # take them from the offered Proposal instead of the MTP drafter
    # stop drafting at the first MTP draft the drafter itself gives less than this probability
    # (the draft is dropped; before the first one the step is a plain one); 0: never stop
    min_confidence: float = 0.0
    expected_speedup: float | None = None  # E(k)/T(k) over 1/T(0) by the policy's cost model (None: none)
    # the estimated acceptance of each draft position, given the ones before (a batch cuts drafts
    # by it: policies.batch); empty: unknown, and a batch keeps the drafts unless rows run out
    rates: tuple[float, ...] = ()


class DraftPolicy(Protocol):
    """Chooses each step's drafts; one instance per request, on the engine thread."""

    @property
    def name(self) -> str: ...

    def plan(self, offer: Proposal, content_class: str) -> Plan:
        """The next step, given what a lookup offers to copy and the kind of text being written."""
        ...

    def observe(self, drafted: int, accepted: int, seconds: float, stopped: bool) -> None:
        """After every step: how many drafts the target accepted and the step's time; `stopped`:
        the drafter dropped a draft below the plan's min_confidence."""
        ...

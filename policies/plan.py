"""What a draft policy is offered and decides each step."""

from __future__ import annotations

from dataclasses import dataclass


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

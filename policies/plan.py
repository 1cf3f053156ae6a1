"""What a draft policy decides each step."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    k: int = 0  # tokens to draft (0: a plain decode step)
    lookup: bool = False  # take them from the context lookup's offer instead of the MTP drafter

"""Policies that ignore the content: `off` (never draft) and `fixed:K` (always draft K with the
MTP drafter; lookup copies are the adaptive policy's)."""

from __future__ import annotations

from dataclasses import dataclass

from policies.plan import NO_OFFER, Plan, Proposal


@dataclass
class Fixed:
    k: int

    @property
    def name(self) -> str:
        return "off" if self.k == 0 else f"fixed:{self.k}"

    def plan(self, offer: Proposal = NO_OFFER) -> Plan:
        """The next step. `offer`: what a lookup (the context or the phrasebook) offers to copy."""
        return Plan(self.k)

    def observe(self, drafted: int, accepted: int, seconds: float, stopped: bool = False) -> None:
        """Told after every step how many drafted tokens the target accepted, and its time;
        `stopped`: the drafter stopped below the plan's min_confidence (one more draft made, dropped)."""

    def observe_text(self, text: str) -> None:
        """Told the prompt's text, then the text of every step."""

"""Policies that ignore the content: `off` (never draft) and `fixed:K` (always draft K with the
MTP drafter; the context lookup is the adaptive policy's)."""

from __future__ import annotations

from dataclasses import dataclass

from policies.plan import Plan


@dataclass
class Fixed:
    k: int

    @property
    def name(self) -> str:
        return "off" if self.k == 0 else f"fixed:{self.k}"

    def plan(self, lookup: int = 0, match: int = 0) -> Plan:
        """The next step. `lookup`: how many tokens the context lookup offers, after an n-gram
        match of length `match`."""
        return Plan(self.k)

    def observe(self, drafted: int, accepted: int, seconds: float) -> None:
        """Told after every step how many drafted tokens the target accepted, and its time."""

    def observe_text(self, text: str) -> None:
        """Told the prompt's text, then the text of every step."""

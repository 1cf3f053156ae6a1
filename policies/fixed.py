"""Policies that ignore the content: `off` (never draft) and `fixed:K` (always draft K with the
MTP drafter; lookup copies are the adaptive policy's)."""

from __future__ import annotations

from dataclasses import dataclass

from policies.plan import Plan, Proposal


@dataclass
class Fixed:
    k: int

    @property
    def name(self) -> str:
        return "off" if self.k == 0 else f"fixed:{self.k}"

    def plan(self, offer: Proposal, content_class: str) -> Plan:
        return Plan(self.k)

    def observe(self, drafted: int, accepted: int, seconds: float, stopped: bool) -> None:
        pass

"""Policies that ignore the content: `off` (never draft) and `fixed:K` (always draft K)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Fixed:
    k: int

    @property
    def name(self) -> str:
        return "off" if self.k == 0 else f"fixed:{self.k}"

    def draft_length(self) -> int:
        """Tokens to draft in the next step (0: a plain decode step)."""
        return self.k

    def observe(self, drafted: int, accepted: int, seconds: float) -> None:
        """Told after every step how many drafted tokens the target accepted, and its time."""

    def observe_text(self, text: str) -> None:
        """Told the prompt's text, then the text of every step."""

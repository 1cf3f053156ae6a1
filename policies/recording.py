"""A draft policy wrapped so that every step is remembered, with the content class it was taken in
and the speed-up the cost model expected of it (for metrics and logs)."""

from __future__ import annotations

from dataclasses import dataclass

from policies.classifier import ContentTracker
from policies.plan import NO_OFFER, Plan, Proposal


@dataclass(frozen=True)
class StepRecord:
    content_class: str
    drafted: int
    accepted: int
    seconds: float
    expected_speedup: float | None  # E(k)/T(k) over 1/T(0), from the shared estimates
    lookup: bool = False  # copied from a lookup's offer rather than drafted by the MTP drafter


class Recording:
    def __init__(self, policy, shared=None):
        """shared: the adaptive policy's SharedEstimates, for expected speed-ups (None: not known)."""
        self.policy = policy
        self.shared = shared
        self.tracker = ContentTracker()
        self.steps: list[StepRecord] = []
        self._class = self.tracker.current
        self._plan = Plan()
        self._expected = None

    @property
    def name(self) -> str:
        return self.policy.name

    def plan(self, offer: Proposal = NO_OFFER) -> Plan:
        self._plan = self.policy.plan(offer)
        self._class = self.tracker.current
        self._expected = None
        if self.shared is not None and self._plan.k > 0:
            self._expected = self.shared.expected_speedup(self._class, self._plan, offer)
        return self._plan

    def observe(self, drafted: int, accepted: int, seconds: float, stopped: bool = False) -> None:
        self.steps.append(StepRecord(self._class, drafted, accepted, seconds, self._expected, self._plan.lookup))
        self.policy.observe(drafted, accepted, seconds, stopped)

    def observe_text(self, text: str) -> None:
        self.tracker.feed(text)
        self.policy.observe_text(text)

    def realised_speedup(self) -> float | None:
        """Tokens per second of this request's speculative steps over the plain rate 1/T(0)."""
        spec = [s for s in self.steps if s.drafted]
        if not spec or self.shared is None:
            return None
        seconds = sum(s.seconds for s in spec)
        return sum(s.accepted + 1 for s in spec) / seconds * self.shared.costs.predict(0) if seconds > 0 else None

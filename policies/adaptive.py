"""The adaptive draft policy: content-aware, acceptance-driven, off when it loses.

Every step it reads the content class of the text so far (policies.classifier), the request's
acceptance estimates for that class (policies.acceptance) and the step costs (policies.cost), and
picks k = argmax E(k) / T(k). k = 0 (plain decoding) whenever that wins. While off it still probes
with k = 1 now and then (backing off while probes keep losing), so it switches back on when the
content changes; while on, it now and then tries one more draft so deeper positions keep estimates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from policies.acceptance import AcceptanceCounts, RequestAcceptance
from policies.classifier import ContentTracker
from policies.cost import StepCosts, best_draft_length, save_json

K_MAX = 8
OPTIMISTIC_RATE = 0.9  # probing is pointless when even this acceptance at every position cannot pay
OFF_MARGIN = 0.03  # plain must beat the best k by 3% before speculation switches off


class SharedEstimates:
    """Shared by all requests on one (model, drafter, machine): acceptance prior and step costs."""

    def __init__(self, costs: StepCosts, acceptance: AcceptanceCounts | None = None, path: Path | None = None):
        self.costs = costs
        self.acceptance = acceptance or AcceptanceCounts(costs.k_max)
        self.path = path

    def save(self) -> None:
        if self.path is not None:
            save_json(self.path, {"costs": self.costs.to_dict(), "acceptance": self.acceptance.to_dict()})

    @classmethod
    def load(cls, path: Path) -> SharedEstimates | None:
        import json

        try:
            data = json.loads(path.read_text())
            costs = StepCosts.from_dict(data["costs"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # missing or unreadable: calibrate again
        acceptance = AcceptanceCounts(costs.k_max)
        acceptance.load_dict(data.get("acceptance", {}))
        return cls(costs, acceptance, path)


class AdaptivePolicy:
    name = "adaptive"

    def __init__(self, shared: SharedEstimates, k_max: int = K_MAX, probe_every: int = 8, explore_every: int = 12):
        self.shared = shared
        self.k_max = min(k_max, shared.costs.k_max)
        self.acceptance = RequestAcceptance(shared.acceptance)
        self.tracker = ContentTracker()
        self.probe_every = self.base_probe_every = probe_every
        self.explore_every = explore_every
        self.steps_off = 0
        self.steps_on = 0
        self.probing = False
        self.klass = self.tracker.current  # the class the current step was chosen for

    def observe_text(self, text: str) -> None:
        before = self.tracker.current
        if self.tracker.feed(text) != before:
            self.probe_every = self.base_probe_every  # new content: look again soon

    def _best(self) -> int:
        return best_draft_length(self.acceptance.rates(self.klass), self.shared.costs, self.k_max, OFF_MARGIN)

    def _could_pay(self) -> bool:
        """Whether any k could beat plain decoding if drafts were accepted at OPTIMISTIC_RATE."""
        optimistic = np.full(self.k_max, OPTIMISTIC_RATE)
        return best_draft_length(optimistic, self.shared.costs, self.k_max, OFF_MARGIN) > 0

    def draft_length(self) -> int:
        self.klass = self.tracker.current
        k = self._best()
        self.probing = False
        if k == 0:
            self.acceptance.relax(self.klass)
            self.steps_off += 1
            if self.steps_off >= self.probe_every and self._could_pay():
                self.steps_off, self.probing = 0, True
                return 1
            return 0
        self.steps_off = 0
        self.probe_every = self.base_probe_every
        self.steps_on += 1
        if self.steps_on % self.explore_every == 0 and k < self.k_max:
            return k + 1
        return k

    def observe(self, drafted: int, accepted: int, seconds: float) -> None:
        self.shared.costs.observe(drafted, seconds)
        if drafted:
            self.acceptance.observe(self.klass, drafted, accepted)
        if self.probing and self._best() == 0:
            self.probe_every = min(self.probe_every * 2, 32)  # probes keep losing: probe less often

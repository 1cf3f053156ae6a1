"""The adaptive draft policy: content-aware, acceptance-driven, off when it loses.

Every step it reads the content class of the text so far (policies.classifier), the request's
acceptance estimates for that class (policies.acceptance) and the step costs (policies.cost), and
picks k = argmax E(k) / T(k). k = 0 (plain decoding) whenever that wins. While off it still probes
with k = 1 now and then (backing off while probes keep losing), so it switches back on when the
content changes; while on, it now and then tries one more draft so deeper positions keep estimates.
When a lookup offers a continuation (the context, else the target's phrasebook), its own estimates
(per class, source and match length) and its cheaper rounds decide whether copying beats the
drafter, and how many tokens to copy. Its MTP plans carry a confidence floor: a draft the drafter
itself gives less probability than the floor is dropped, the floor being what one more verified row
costs in tokens at the plan's expected speed (`confidence_floor`); a dropped draft counts as a
rejected one, so a floor that drops most drafts turns drafting off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import structlog

from policies.acceptance import (
    LOOKUP_KEYS,
    AcceptanceCounts,
    RequestAcceptance,
    lookup_key,
    lookup_prior,
)
from policies.batch import Shares
from policies.classifier import PROSE
from policies.cost import (
    RowCosts,
    StepCosts,
    best_draft_length,
    best_lookup_length,
    confidence_floor,
    save_json,
    throughput,
)
from policies.plan import Plan, Proposal

K_MAX = 8
OPTIMISTIC_RATE = 0.9  # probing is pointless when even this acceptance at every position cannot pay
OFF_MARGIN = 0.03  # plain must beat the best k by 3% before speculation switches off


class SharedEstimates:
    """Shared by all requests on one (model, drafter, machine): acceptance prior and step costs."""

    def __init__(self, costs: StepCosts, acceptance: AcceptanceCounts | None = None, path: Path | None = None,
                 lookup: AcceptanceCounts | None = None, rows: RowCosts | None = None):
        self.costs = costs
        self.rows = rows  # a batch's forward time (policies.batch); None: not probed yet
        self.batch = None  # policies.batch.Shares while a batch runs several sequences: its step's prices
        self.acceptance = acceptance or AcceptanceCounts(costs.k_max)
        self.lookup = lookup or AcceptanceCounts(costs.k_max, prior=lookup_prior(costs.k_max), keys=LOOKUP_KEYS)
        self.path = path
        self.unsaved = False  # a save failed (logged once)

    def save(self) -> None:
        """To `path`; a disk that is full or read-only loses only the file (logged once): the
        next start probes again."""
        if self.path is None:
            return
        try:
            save_json(self.path, {
                "costs": self.costs.to_dict(), "acceptance": self.acceptance.to_dict(), "lookup": self.lookup.to_dict(),
                **({"rows": self.rows.to_dict()} if self.rows is not None else {}),
            })
        except OSError as e:
            if not self.unsaved:
                structlog.get_logger().warning("calibration not saved", file=str(self.path), error=str(e))
            self.unsaved = True

    def expected_speedup(self, cls: str, plan: Plan, offer: Proposal) -> float:
        """E(k)/T(k) of a plan over the plain rate 1/T(0), from the shared estimates."""
        rates = self.lookup.rates(lookup_key(cls, offer.match, offer.source)) if plan.lookup else self.acceptance.rates(cls)
        return throughput(rates, plan.k, self.costs, plan.lookup) / throughput(rates, 0, self.costs)

    @classmethod
    def load(cls, path: Path) -> SharedEstimates | None:
        import json

        try:
            data = json.loads(path.read_text())
            costs = StepCosts.from_dict(data["costs"])
            rows = RowCosts.from_dict(data["rows"]) if "rows" in data else None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # missing or unreadable: calibrate again
        shared = cls(costs, path=path, rows=rows)
        shared.acceptance.load_dict(data.get("acceptance", {}))
        shared.lookup.load_dict(data.get("lookup", {}))
        return shared


class AdaptivePolicy:
    def __init__(self, shared: SharedEstimates, k_max: int = K_MAX, probe_every: int = 8, explore_every: int = 12,
                 lookup: bool = True):
        """lookup: consider lookup offers (False: the MTP drafter alone)."""
        self.shared = shared
        self.name = "adaptive" if lookup else "adaptive:mtp"
        self.use_lookup = lookup
        self.k_max = min(k_max, shared.costs.k_max)
        self.acceptance = RequestAcceptance(shared.acceptance)
        self.lookup = RequestAcceptance(shared.lookup)
        self.lookup_key: str | None = None  # the current step copies a lookup's offer, with these estimates
        self.probe_every = self.base_probe_every = probe_every
        self.explore_every = explore_every
        self.steps_off = 0
        self.steps_on = 0
        self.probing = False
        self.klass = PROSE  # the content class the current step was planned for

    def _best(self) -> int:
        return best_draft_length(self.acceptance.rates(self.klass), self.shared.costs, self.k_max, OFF_MARGIN)

    def _could_pay(self) -> bool:
        """Whether any k could beat plain decoding if drafts were accepted at OPTIMISTIC_RATE."""
        optimistic = np.full(self.k_max, OPTIMISTIC_RATE)
        return best_draft_length(optimistic, self.shared.costs, self.k_max, OFF_MARGIN) > 0

    def _lookup_plan(self, offer: Proposal, mtp_k: int, costs: StepCosts | Shares) -> Plan | None:
        """Copy the offer when that is expected to beat both the drafter's best k and plain
        decoding (by the off margin), at `costs` (alone: the step costs; in a batch: this
        sequence's share of the step); else leave its lookup estimates to relax."""
        key = lookup_key(self.klass, offer.match, offer.source)
        rates = self.lookup.rates(key)
        k = best_lookup_length(rates, costs, min(len(offer.tokens), self.k_max))
        rival = max(throughput(self.acceptance.rates(self.klass), mtp_k, costs), throughput(rates, 0, costs) * (1 + OFF_MARGIN))
        if throughput(rates, k, costs, lookup=True) > rival:
            self.lookup_key = key
            return Plan(k, lookup=True, expected_speedup=self.shared.expected_speedup(self.klass, Plan(k, True), offer),
                        rates=tuple(float(r) for r in rates[:k]))
        self.lookup.relax(key)
        return None

    def _batch_plan(self, batch: Shares, offer: Proposal) -> Plan:
        """In a batch of several sequences: a copy of the lookup's offer where its estimates price
        it above the drafter's draft and plain decoding at this sequence's share of the batch's
        step (a copied row needs no drafter forward), else one draft from the drafter where that
        share prices it above plain decoding, else none. The drafts of a step's sequences share the
        drafter's forwards and the target's, so a step in which every sequence drafts one is the
        batch's cheapest way to draft from the drafter (in-process, 8 sequences on the 2-vCPU AMD
        VM: fixed:1 x1.12-1.43 over off, longer drafts priced one sequence at a time x0.97-1.10).
        While such a step has not been timed, the draft's rates go unstated, so the batch runs it
        (policies.batch.fit_drafts) and its row costs learn what it costs."""
        if not batch.explored:
            return Plan(1)
        rates = self.acceptance.rates(self.klass)
        k = best_draft_length(rates, batch, 1, OFF_MARGIN)
        if offer.tokens and self.use_lookup and (copy := self._lookup_plan(offer, k, batch)):
            return copy
        if k == 0:
            self.acceptance.relax(self.klass)
            return Plan(0)
        return Plan(1, rates=(float(rates[0]),))

    def plan(self, offer: Proposal, content_class: str) -> Plan:
        if content_class != self.klass:
            self.probe_every = self.base_probe_every  # new content: look again soon
        self.klass = content_class
        self.lookup_key = None
        self.probing = False
        if self.shared.batch is not None:
            return self._batch_plan(self.shared.batch, offer)
        k = self._best()
        if offer.tokens and self.use_lookup and (copy := self._lookup_plan(offer, k, self.shared.costs)):
            return copy
        if k == 0:
            self.acceptance.relax(self.klass)
            self.steps_off += 1
            if self.steps_off >= self.probe_every and self._could_pay():
                self.steps_off, self.probing = 0, True
                return Plan(1, expected_speedup=self.shared.expected_speedup(self.klass, Plan(1), offer),
                            rates=tuple(float(r) for r in self.acceptance.rates(self.klass)[:1]))
            return Plan(0)
        self.steps_off = 0
        self.probe_every = self.base_probe_every
        self.steps_on += 1
        if self.steps_on % self.explore_every == 0 and k < self.k_max:
            k += 1
        rates = self.acceptance.rates(self.klass)
        return Plan(k, min_confidence=confidence_floor(rates, k, self.shared.costs),
                    expected_speedup=self.shared.expected_speedup(self.klass, Plan(k), offer),
                    rates=tuple(float(r) for r in rates[:k]))

    def observe(self, drafted: int, accepted: int, seconds: float, stopped: bool) -> None:
        """`stopped`: the drafter dropped a draft below the confidence floor; it counts as rejected,
        and the round, which paid for one more draft than it verified, is not timed."""
        copied = self.lookup_key is not None
        if not stopped:
            self.shared.costs.observe(drafted, seconds, lookup=copied)
        if copied:
            self.lookup.observe(self.lookup_key, drafted, accepted)
            return
        if drafted or stopped:
            self.acceptance.observe(self.klass, drafted + stopped, accepted)
        if self.probing and self._best() == 0:
            self.probe_every = min(self.probe_every * 2, 32)  # probes keep losing: probe less often

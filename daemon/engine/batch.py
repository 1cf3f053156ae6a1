"""Continuous batching: the running sequences share one target forward per step.

A `Batch` holds the running sequences (daemon.engine.generate.sequence coroutines) and steps them
together:
1. every sequence runs until it asks for a forward (a prefill chunk, a decode row) or has planned
   a draft; the records it yields on the way are delivered to its owner;
2. the planned drafts are fitted to the batch (policies.batch): a draft whose row costs the batch
   more than it is expected to bring is dropped, and drafts go while the rows pass the limit;
3. those sequences draft, their drafter forwards run together, one per draft position
   (daemon.engine.ragged.run_drafts), and they ask for their verification forwards;
4. one forward runs every sequence's rows (daemon.engine.ragged), or, for a model that cannot,
   each sequence's in turn; each sequence is sent its own part.
Sequences join between steps (`add`) and leave when they end or are dropped (`drop`: cancelled,
past their deadline), freeing their rows at once. A sequence that fails is delivered its error and
leaves; the others go on. Runs on the thread that owns MLX.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import mlx.core as mx

from daemon.engine.ragged import batchable, run_drafts, run_ragged
from daemon.engine.records import Delta
from daemon.engine.rows import DraftCall, Forward, Planned, Ran, run
from daemon.models.block import is_block
from policies.batch import Clock, Shares, draft_units, fit_drafts, shares
from policies.cost import RowCosts

DRAFT_ALPHA = 0.1  # the moving average of the drafting time per draft
REMEASURE = 32  # steps at a count of sequences between two steps in which every sequence drafts one (policies.batch.Shares)


def run_rows(model, forwards: list[Forward], ragged: bool) -> list[Ran]:
    """Every Forward of a step, in one forward where the model allows it (`ragged`: `batchable`)."""
    if len(forwards) == 1:
        return [run(model, forwards[0])]
    if ragged:
        return run_ragged(model, forwards)
    return [run(model, f, alone=False) for f in forwards]


@dataclass
class Running:
    owner: object  # whoever the records go to (the worker's job)
    steps: Generator
    reply: object = None
    asked: Forward | Planned | DraftCall | None = None
    verified: int | None = None  # drafts its last decode forward verified (None: it was no decode row)


@dataclass(frozen=True)
class StepReport:
    sequences: int  # sequences in the step's forward
    rows: int  # the forward's rows
    drafted: int  # of them, drafts
    seconds: float  # the forward's time


class Batch:
    def __init__(self, model, deliver: Callable[[object, object], None], max_rows: int,
                 rows: RowCosts | None = None, draft_seconds: float = 0.0, drafter=None, shared=None):
        """deliver(owner, record or exception); max_rows: a step's rows at most (drafts are cut
        to fit; prefill chunks and one row per sequence always run); rows: the batch's forward
        costs, learned from every step (None: drafts are cut only to fit max_rows); draft_seconds:
        one draft's time at first (the probe's), then learned from the batch's drafting; drafter:
        the sequences' drafter, whose forwards of a draft position run together where it allows;
        shared: the sequences' policies.adaptive.SharedEstimates, given each step's prices
        (policies.batch.Shares) while several sequences run."""
        self.model, self.deliver, self.max_rows = model, deliver, max_rows
        self.drafts_together = getattr(drafter, "ragged", False)
        self.drafts_block = is_block(drafter)
        self.ragged = batchable(model)
        self.costs, self.draft_seconds, self.shared = rows, draft_seconds, shared
        self.verify_seconds = 0.0  # what a verified round costs a sequence beyond its rows, learned (`_observe_verifying`)
        self.running: list[Running] = []
        self.clock = Clock()
        self._priced: dict[int, int] = {}  # steps priced per count of sequences (`_shares`)
        self._timed: tuple[int, bool, float] | None = None  # the last clean decode step: sequences, drafting, start
        self._delivered = 0  # tokens delivered since the last step's forward

    def add(self, owner, steps: Generator) -> None:
        self.running.append(Running(owner, steps))

    def drop(self, running: Running) -> None:
        self.running.remove(running)
        running.steps.close()

    def step(self, arrivals: Callable[[], None] | None = None) -> StepReport | None:
        """One step of every running sequence; None when none asked for a forward. `arrivals()`
        runs just before the forward and may `add` sequences: their first prefill chunk joins it."""
        step_started, self._delivered = time.perf_counter(), 0
        if self.shared is not None:
            self.shared.batch = self._shares()
        took = []
        for r in self.running[::-1]:  # the newest first: a first token goes out before the others draft
            started = time.perf_counter()
            self._advance(r)
            took.append((r.verified, time.perf_counter() - started))
        self._observe_verifying(took)
        if self._timed is not None:  # the tokens of the last step's forward are out: time it, round to round
            sequences, drafting, started = self._timed
            self.clock.observe(sequences, drafting, self._delivered, step_started - started)
        self._timed = None
        planned = [r for r in self.running if isinstance(r.asked, Planned)]
        if planned:
            started = time.perf_counter()
            drafting = [r for r in planned if not r.asked.plan.lookup]  # the others copy a lookup's offer
            for r, k in zip(planned, self._fit(planned)):
                r.reply = k
                self._advance(r)
            self._draft(drafting)
            self._observe_drafting(drafting, time.perf_counter() - started)
        if arrivals is not None:
            before = len(self.running)
            arrivals()
            for r in self.running[before:]:
                self._advance(r)
        asking = [r for r in self.running if isinstance(r.asked, Forward)]
        if not asking:
            return None
        forwards = [r.asked for r in asking]
        started = time.perf_counter()
        try:
            rans = run_rows(self.model, forwards, self.ragged)
        except Exception as e:
            self._lose(asking, e)
            return None
        if len(rans) > 1:  # computed now, so the forward is timed (its sequences read it next)
            mx.eval([a for ran in rans for a in (ran.logits, ran.hidden) if a is not None])
        seconds = time.perf_counter() - started
        decoding = True
        for r, ran in zip(asking, rans):
            decode = len(r.asked.tokens) == 1 + r.asked.drafts and r.asked.logits == "all"
            decoding = decoding and decode
            r.reply, r.asked, r.verified = ran, None, r.asked.drafts if decode else None
        rows = sum(len(f.tokens) for f in forwards)
        drafted = sum(f.drafts for f in forwards)
        if decoding and len(forwards) > 1 and len(forwards) == len(self.running):
            self._timed = (len(forwards), drafted > 0, step_started)
        if self.costs is not None and len(forwards) > 1:
            self.costs.observe(rows, len(forwards), seconds)
        return StepReport(len(forwards), rows, drafted, seconds)

    def _draft(self, planned: list[Running]) -> None:
        """Runs the sequences' drafter forwards, those of one draft position together, until every
        one has drafted (and asks for its verification)."""
        while calling := [r for r in planned if isinstance(r.asked, DraftCall)]:
            try:
                replies = run_drafts(self.model, [r.asked for r in calling])
            except Exception as e:
                self._lose(calling, e)
                return
            for r, reply in zip(calling, replies):
                r.reply, r.asked = reply, None
                self._advance(r)

    def _lose(self, sharing: list[Running], error: Exception) -> None:
        """A forward failed: every sequence in it is delivered the error and leaves."""
        for r in sharing:
            self.deliver(r.owner, error)
            self.drop(r)

    def _fit(self, planned: list[Running]) -> list[int]:
        asks = [r.asked for r in planned]
        plans = [(a.plan.k, a.plan.rates) for a in asks]
        if len(self.running) == 1:  # alone, its policy has priced its rows already
            return [k for k, _ in plans]
        if all(len(rates) >= k for k, rates in plans) and not self.clock.drafts_pay(len(self.running)):
            return [0] * len(plans)
        base = len(planned) + sum(len(r.asked.tokens) for r in self.running if isinstance(r.asked, Forward))
        sequences = len(self.running)
        row_seconds = (lambda n: self.costs.predict(n, sequences)) if self.costs is not None else (lambda n: 1.0)
        priced = self.costs is not None
        return fit_drafts(plans, base, row_seconds, self.draft_seconds if priced else 0.0, self.max_rows,
                          self.drafts_together, self.verify_seconds if priced else 0.0, self.drafts_block,
                          [a.plan.lookup for a in asks])

    def _shares(self) -> Shares | None:
        """Each sequence's prices in this step (None: alone, or no row costs to price by). Every
        REMEASURE-th step at a count of sequences is priced as not yet explored, so a step in which
        every sequence drafts one runs and its time stays current where drafting has stopped."""
        sequences = len(self.running)
        if sequences < 2 or self.costs is None:
            return None
        self._priced[sequences] = self._priced.get(sequences, 0) + 1
        return shares(self.costs, sequences, self.draft_seconds, self.verify_seconds, self.drafts_together,
                      self.shared.costs.k_max, self.drafts_block, self._priced[sequences] % REMEASURE == 0)

    def _observe_verifying(self, took: list[tuple[int | None, float]]) -> None:
        """What a verified round costs a sequence beyond its rows and drafts (acceptance, the
        rollback of its caches, its drafter's rewind): the time a sequence that verified drafts took
        to read its forward and plan its next step, over one that decoded a plain row, in the same
        step (a moving average)."""
        verified = [t for v, t in took if v]
        plain = [t for v, t in took if v == 0]
        if verified and plain and len(self.running) > 1:
            extra = sum(verified) / len(verified) - sum(plain) / len(plain)
            self.verify_seconds += DRAFT_ALPHA * (max(extra, 0.0) - self.verify_seconds)

    def _observe_drafting(self, planned: list[Running], seconds: float) -> None:
        """The drafting time the fit prices, learned from what drafting took in this batch (a
        moving average per unit, counted as the fit counts them: policies.batch.draft_units)."""
        drafts = [r.asked.drafts for r in planned if isinstance(r.asked, Forward) and r.asked.drafts]
        if drafts and len(self.running) > 1:
            units = draft_units(drafts, self.drafts_together, self.drafts_block)
            self.draft_seconds += DRAFT_ALPHA * (seconds / units - self.draft_seconds)

    def _advance(self, r: Running) -> None:
        """Runs a sequence until it asks for something; delivers its records on the way."""
        while True:
            try:
                item = r.steps.send(r.reply)
            except StopIteration:
                self.running.remove(r)
                return
            except Exception as e:
                self.deliver(r.owner, e)
                self.drop(r)
                return
            r.reply = None
            if isinstance(item, (Forward, Planned, DraftCall)):
                r.asked = item
                return
            if isinstance(item, Delta):
                self._delivered += len(item.token_ids)
            self.deliver(r.owner, item)

"""Draft lengths for a batch: the sequences' own plans, cut where their rows cost the batch more
than they bring.

Every running sequence plans its draft alone (its policy, its acceptance estimates, its content
class). In a batch all of them share one target forward, whose time T(rows) grows with the rows of
every sequence, so a draft is worth its row only if what it is expected to bring (the probability
that it and every draft before it are accepted) beats what the row adds to everyone's step. The
batch's rate is (sequences + sum of expected accepted drafts) / (T(rows) + drafting time), the
drafting time counted in `draft_units`; drafts are dropped one at a time, last positions first and
the least likely of those first, while that rate rises, and always while the rows exceed the
limit; what is left must beat no drafts by a margin. So speculation fades as the batch grows
compute-bound and comes back as it shrinks; alone, T's slope is what the policy already priced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from policies.cost import RowCosts

UNKNOWN = 1.0  # a plan without estimates (fixed:K) is cut last, and only for the row limit
# the drafts that are left must beat no drafts by this much, or all go: a speculative round costs
# each sequence more than its rows and drafts (acceptance, rewinds, host syncs), and without a
# margin `adaptive` lost ~5% to `off` at 4 and 8 clients (bench/load.py)
BATCH_MARGIN = 0.10


def gains(rates: Sequence[float], k: int) -> list[float]:
    """The expected tokens each of the first k drafts adds: prod of the rates up to it."""
    return list(np.cumprod(rates[:k])) if len(rates) >= k else [UNKNOWN] * k


def draft_units(ks: Sequence[int], together: bool, block: bool = False) -> int:
    """The drafting time of a step in drafter forwards: one per draft (`together`: one per draft
    position, the sequences' drafts of a position running in one forward; `block`: one per drafting
    sequence whatever its k, or one in all `together`), and one more per drafting sequence (its
    catch-up on the rows it has not read, the verification's bookkeeping)."""
    drafting = sum(k > 0 for k in ks)
    if block:  # one forward per sequence, or one for them all
        return (min(drafting, 1) if together else drafting) + drafting
    return (max(ks, default=0) if together else sum(ks)) + drafting


def fit_drafts(plans: Sequence[tuple[int, Sequence[float]]], base_rows: int, row_seconds: Callable[[int], float],
               draft_seconds: float, max_rows: int, together: bool = False, verify_seconds: float = 0.0,
               block: bool = False, copies: Sequence[bool] = ()) -> list[int]:
    """plans: each sequence's (planned k, its rates: empty if unknown); base_rows: the step's rows
    without any draft (one per planned sequence, plus everyone else's); row_seconds(rows): the
    step's forward time; draft_seconds: the time of one of `draft_units`; together: the drafts of a
    position run in one drafter forward; verify_seconds: what a sequence's verified round costs
    beyond its rows (acceptance, rollback); block: a drafter forward proposes any k; copies: which
    plans copy a lookup's offer (no drafter forward; none if empty). Returns each sequence's k."""
    ks = [k for k, _ in plans]
    worth = [gains(rates, k) for k, rates in plans]
    known = [len(rates) >= k for k, rates in plans]
    tokens = len(plans) + sum(sum(g) for g in worth)
    copied = list(copies) or [False] * len(plans)

    def rate(tokens: float, ks: list[int]) -> float:
        drafted = [0 if c else k for k, c in zip(ks, copied)]
        drafting = draft_seconds * draft_units(drafted, together, block) + verify_seconds * sum(k > 0 for k in ks)
        return tokens / (row_seconds(base_rows + sum(ks)) + drafting)

    def without(i: int, ks: list[int]) -> tuple[float, list[int]]:  # sequence i's last draft dropped
        return tokens - worth[i][ks[i] - 1], ks[:i] + [ks[i] - 1] + ks[i + 1 :]

    while any(ks):
        over = base_rows + sum(ks) > max_rows
        estimated = [j for j in range(len(ks)) if ks[j] and known[j]]
        if not estimated and not over:
            break
        after, _, first = max((rate(*without(j, ks)), -worth[j][ks[j] - 1], -j)  # of equals, the first
                              for j in estimated or [j for j in range(len(ks)) if ks[j]])
        i = -first
        if not over and after <= rate(tokens, ks):
            break
        tokens, ks = without(i, ks)
    if all(known) and any(ks) and rate(tokens, ks) < rate(len(plans), [0] * len(ks)) * (1 + BATCH_MARGIN):
        return [0] * len(ks)
    return ks


class Shares:
    """One sequence's prices in a batch's step, in the terms the adaptive policy plans with (what
    it reads of policies.cost.StepCosts): its share of the plain forward, what each row it adds
    costs the batch's forward, what each draft position costs it (a share of a drafter forward
    where the drafts of a position run together; `block`: one for any k) and what a verified round
    costs it whatever k (its drafter's catch-up, acceptance and rewind). Alone, a draft costs a
    sequence its drafter call and a verified row; in a batch the forward is shared and so is the
    drafter's, so what pays is another thing. `explored`: a forward in which every sequence drafts
    one has run often enough to price that row (policies.cost.RowCosts.measured)."""

    def __init__(self, share: float, row: float, draft: float, fixed: float, k_max: int, block: bool = False,
                 explored: bool = True):
        self.share, self.row, self.draft, self.fixed, self.k_max, self.block = share, row, draft, fixed, k_max, block
        self.explored = explored
        self.t_verify = [share + n * row for n in range(k_max + 1)]

    def predict(self, k: int, lookup: bool = False) -> float:
        if k == 0:
            return self.share
        drafting = 0.0 if lookup else self.draft * (1 if self.block else k)
        return self.share + k * self.row + drafting + self.fixed


def shares(rows: RowCosts, sequences: int, draft_seconds: float, verify_seconds: float, together: bool, k_max: int,
           block: bool = False, remeasure: bool = False) -> Shares:
    """A sequence's Shares in a step of `sequences` decoding sequences, each drafting one (its
    row: (T(2n) - T(n)) / n); draft_seconds: one unit of policies.batch.draft_units; remeasure:
    priced as not yet explored, so that step runs again."""
    plain = rows.predict(sequences, sequences)
    row = (rows.predict(2 * sequences, sequences) - plain) / sequences
    per_position = draft_seconds / sequences if together else draft_seconds
    return Shares(plain / sequences, row, per_position, draft_seconds + verify_seconds, k_max, block,
                  rows.measured(2 * sequences, sequences) and not remeasure)


class Clock:
    """The batch's check of its prices against the clock: tokens per second of clean decode steps
    (no prefill rows) that verified drafts and of those that did not, per count of running
    sequences (moving averages). Where drafting steps have run slower than plain ones, a step's
    priced drafts are dropped; every EXPLORE-th step at a count runs the other way, so both stay
    measured and drafts come back when they pay again."""

    EXPLORE = 8
    MIN_STEPS = 4  # of each kind before the clock overrules the prices
    ALPHA = 0.1

    def __init__(self) -> None:
        self.rates: dict[tuple[int, bool], tuple[float, int]] = {}  # (sequences, drafting) -> (rate, steps)
        self.steps: dict[int, int] = {}

    def observe(self, sequences: int, drafting: bool, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        rate, n = self.rates.get((sequences, drafting), (tokens / seconds, 0))
        self.rates[sequences, drafting] = (rate + self.ALPHA * (tokens / seconds - rate), n + 1)

    def drafts_pay(self, sequences: int) -> bool:
        """Whether this step at `sequences` runs its priced drafts (False: none)."""
        self.steps[sequences] = self.steps.get(sequences, 0) + 1
        drafting, plain = (self.rates.get((sequences, d), (0.0, 0)) for d in (True, False))
        measured = drafting[1] >= self.MIN_STEPS and plain[1] >= self.MIN_STEPS
        pays = not measured or drafting[0] >= plain[0]
        explore = self.steps[sequences] % self.EXPLORE == 0
        return pays != explore

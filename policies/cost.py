"""Step costs: seconds of one decoding step as a function of the draft length k.

T(0) is a plain step; T(k) = k * t_draft + t_verify(k+1) (Leviathan et al.), or for a block drafter,
whose one forward proposes the whole block, t_draft + t_verify(k+1); first from a short probe at
start-up, then replaced by running medians of the real steps, which include everything a
round costs (the drafter's catch-up, host syncs, acceptance). A round copied from a lookup
costs t_verify(k+1) alone, and has running medians of its own. A median, not a mean: a step
the machine stalled (another process, a page fault) would otherwise raise the price of whichever
draft length happened to run then, and a draft length that then runs seldom keeps it for long (a
one-draft round priced at 49 ms where its rounds' median was 41). Saved per (model, drafter,
machine) so a restarted daemon starts calibrated.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from policies.acceptance import expected_tokens


class StepCosts:
    def __init__(self, t_draft: float, t_verify: list[float], alpha: float = 0.1, block: bool = False):
        """t_verify[n - 1]: seconds of a target forward over n positions (n = 1 .. k_max + 1);
        t_draft: one drafter forward (`block`: it drafts any k at once)."""
        self.k_max = len(t_verify) - 1
        self.alpha = alpha
        self.t_draft, self.t_verify, self.block = t_draft, list(t_verify), block
        self.probed = [(min(k, 1) if block else k) * t_draft + t_verify[k] for k in range(self.k_max + 1)]
        self.seconds = list(self.probed)
        self.observations = [0] * (self.k_max + 1)
        self.lookup_seconds = list(t_verify)
        self.lookup_observations = [0] * (self.k_max + 1)
        self.scale = 1.0  # real speculative rounds / probe, applied to draft lengths not yet seen

    def predict(self, k: int, lookup: bool = False) -> float:
        seconds, observations, probed = self._table(lookup)
        if k == 0 or observations[k]:
            return seconds[k]
        return probed[k] * self.scale

    def observe(self, k: int, seconds: float, lookup: bool = False) -> None:
        """A real step of draft length k took `seconds` (`lookup`: copied from a lookup)."""
        if 0 <= k <= self.k_max and seconds > 0:
            table, observations, probed = self._table(lookup)
            if k:
                self.scale += self.alpha * (seconds / probed[k] - self.scale)
            table[k] = running_median(table[k], seconds, self.alpha * MEDIAN_STEP)
            observations[k] += 1

    def _table(self, lookup: bool):
        if lookup:
            return self.lookup_seconds, self.lookup_observations, self.t_verify
        return self.seconds, self.observations, self.probed

    def to_dict(self) -> dict:
        return {
            "t_draft": self.t_draft, "t_verify": self.t_verify, "block": self.block, "seconds": self.seconds,
            "observations": self.observations, "lookup_seconds": self.lookup_seconds,
            "lookup_observations": self.lookup_observations, "scale": self.scale,
        }

    @classmethod
    def from_dict(cls, data: dict) -> StepCosts:
        costs = cls(float(data["t_draft"]), list(data["t_verify"]), block=bool(data.get("block", False)))
        for name in ("seconds", "observations", "lookup_seconds", "lookup_observations"):
            if len(data[name]) != costs.k_max + 1:
                raise ValueError(f"{name} has {len(data[name])} entries, not {costs.k_max + 1}")
            setattr(costs, name, list(data[name]))
        costs.scale = float(data["scale"])
        return costs


MEDIAN_STEP = 0.2  # a running median moves by alpha * this (2%) of itself per step


def running_median(estimate: float, seen: float, step: float) -> float:
    """One step of a running median: `step` of itself up or down toward what was seen, never past it."""
    if seen > estimate:
        return min(estimate * (1 + step), seen)
    return max(estimate * (1 - step), seen)


CELL_SEEN = 3  # batched forwards of a (sequences, rows) count before their running median stands
CELL_STEP = 0.05  # a count's running median moves by this much of itself per forward


class RowCosts:
    """Seconds of one target forward over the rows of several sequences (daemon.engine.ragged).
    Where forwards of this many sequences and rows have run, the running median of their times;
    between two such row counts of as many sequences, the line between them; beside them, the
    nearest one plus the probe's slope. The probe: T(rows) interpolated between probed row counts
    (extrapolated past the last two), plus what each sequence past the first adds (its own
    attention), scaled by a moving average of real batched forwards over it. Real batches have
    their own shape: on the 2-vCPU AMD VM, 4 sequences of one row took 55 ms and of two rows 89
    ms, 8 sequences of one row 102 ms and of two rows 111 ms (16 rows went to OpenBLAS's kernel at
    nearly the cost of 8), while the probe's one slope saw neither; with the few-row products up
    to 24 rows (daemon/cpu/few_rows.c), 4 sequences took 42-45 and 57-60 ms."""

    def __init__(self, rows: list[int], seconds: list[float], per_sequence: float, alpha: float = 0.1):
        self.rows, self.probed, self.per_sequence, self.alpha = list(rows), list(seconds), per_sequence, alpha
        self.scale = 1.0
        self.observations = 0
        self.cells: dict[int, dict[int, list]] = {}  # sequences -> rows -> [running median, forwards, first times]

    def _raw(self, rows: int, sequences: int) -> float:
        base = float(np.interp(rows, self.rows, self.probed))
        if rows > self.rows[-1]:
            slope = (self.probed[-1] - self.probed[-2]) / (self.rows[-1] - self.rows[-2])
            base = self.probed[-1] + slope * (rows - self.rows[-1])
        return base + self.per_sequence * max(sequences - 1, 0)

    def _model(self, rows: int, sequences: int) -> float:
        return self._raw(rows, sequences) * self.scale

    def measured(self, rows: int, sequences: int) -> bool:
        """Whether forwards of this many sequences and rows have run often enough to stand."""
        return self.cells.get(sequences, {}).get(rows, (0.0, 0, []))[1] >= CELL_SEEN

    def predict(self, rows: int, sequences: int) -> float:
        cells = self.cells.get(sequences, {})
        seen = sorted(r for r, (_, count, _) in cells.items() if count >= CELL_SEEN)
        below = [r for r in seen if r <= rows]
        above = [r for r in seen if r >= rows]
        if below and above:
            lo, hi = below[-1], above[0]
            t_lo, t_hi = cells[lo][0], cells[hi][0]
            return t_lo if hi == lo else t_lo + (t_hi - t_lo) * (rows - lo) / (hi - lo)
        if below or above:
            near = below[-1] if below else above[0]
            return cells[near][0] + self._model(rows, sequences) - self._model(near, sequences)
        return self._model(rows, sequences)

    def observe(self, rows: int, sequences: int, seconds: float) -> None:
        if seconds > 0:
            self.scale += self.alpha * (seconds / self._raw(rows, sequences) - self.scale)
            self.observations += 1
            cell = self.cells.setdefault(sequences, {}).setdefault(rows, [seconds, 0, []])
            if cell[1] < CELL_SEEN:  # the first few: their median, so one stalled forward does not start it
                cell[2].append(seconds)
                cell[0] = float(np.median(cell[2]))
            else:
                cell[0] = running_median(cell[0], seconds, CELL_STEP)
            cell[1] += 1

    def to_dict(self) -> dict:
        cells = [[n, r, t, c, first] for n, row in self.cells.items() for r, (t, c, first) in row.items()]
        return {"rows": self.rows, "seconds": self.probed, "per_sequence": self.per_sequence, "scale": self.scale,
                "observations": self.observations, "cells": cells}

    @classmethod
    def from_dict(cls, data: dict) -> RowCosts:
        costs = cls([int(r) for r in data["rows"]], [float(s) for s in data["seconds"]], float(data["per_sequence"]))
        if len(costs.rows) < 2 or len(costs.rows) != len(costs.probed):
            raise ValueError("row costs need two or more probed row counts")
        costs.scale, costs.observations = float(data["scale"]), int(data["observations"])
        for n, r, t, c, first in data.get("cells", []):
            costs.cells.setdefault(int(n), {})[int(r)] = [float(t), int(c), [float(x) for x in first]]
        return costs


def throughput(rates, k: int, costs: StepCosts, lookup: bool = False) -> float:
    """Expected tokens per second with draft length k: E(k) / T(k)."""
    return expected_tokens(rates[:k]) / costs.predict(k, lookup)


def confidence_floor(rates, k: int, costs: StepCosts) -> float:
    """The drafter probability below which a draft does not pay for its verified row: the average
    time one more verified row adds at k drafts, times the tokens per second that k is expected to
    give (a draft accepted with probability p brings p tokens)."""
    if k < 1:
        return 0.0
    row = (costs.t_verify[k] - costs.t_verify[0]) / k
    return row * throughput(rates, k, costs)


def best_lookup_length(rates, costs: StepCosts, offered: int) -> int:
    """argmax_k E(k) / T(k) for a lookup draft of k = 1 .. offered tokens."""
    return max(range(1, min(offered, costs.k_max) + 1), key=lambda k: throughput(rates, k, costs, lookup=True))


def best_draft_length(rates, costs: StepCosts, k_max: int, off_margin: float = 0.0) -> int:
    """argmax_k E(k) / T(k) over k = 1 .. k_max, or 0 (plain decoding) when plain is faster than
    that by more than `off_margin` (a relative hysteresis: near break-even, drafting costs next to
    nothing, while switching off on a noisy low estimate loses real gains)."""
    k_top = min(k_max, costs.k_max)
    if k_top < 1:
        return 0
    best = max(range(1, k_top + 1), key=lambda k: throughput(rates, k, costs))
    return 0 if throughput(rates, 0, costs) > throughput(rates, best, costs) * (1 + off_margin) else best


def save_json(path: Path, data: dict) -> None:
    """Atomic: a crash leaves either the old file or the new one, never half of one; a failed
    write (a full or read-only disk) removes its temporary file and raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise

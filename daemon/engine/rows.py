"""What a sequence asks of the target, and the simplest way to answer: alone.

A sequence (daemon.engine.generate) is a coroutine. When it needs the target to run rows through its
own cache it yields a `Forward` and is sent back a `Ran`; when its policy has planned a draft it
yields a `Planned` and is sent back the draft length it may use; when its drafter must run it
yields a `DraftCall` and is sent back the drafter's logits and block output. Everything else it
yields is an engine record (Delta, Finished). `alone` answers one sequence by itself: the target's
own forward, the drafter's own call and the policy's own plan, as before batching; the scheduler
(daemon.engine.batch) answers many at once, in one target forward per step and one drafter forward
per draft position.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass

import mlx.core as mx

from policies.plan import Plan


@dataclass
class Forward:
    tokens: list[int]
    cache: list  # the sequence's own target cache: the rows go in after what it holds
    logits: str = "all"  # "all" rows [n, V], the "last" row [1, V], or "none" (filling the cache)
    tap: object = None  # a HiddenTap (daemon.engine.forward): with a source, read the hidden states a drafter needs
    source: str | None = None
    drafts: int = 0  # of the rows, drafts to verify


@dataclass
class Ran:
    logits: mx.array | None
    hidden: mx.array | None  # [1, n, H'] when the Forward asked for them
    alone: bool = True  # the forward held this sequence's rows only: its time is its own


@dataclass
class Planned:
    plan: Plan  # its k already within the answer's room


@dataclass
class DraftCall:
    """A drafter forward (daemon.models.mtp.MTPDrafter.draft) over a sequence's own drafter cache."""

    layer: object  # the drafter, or one MTP layer of a checkpoint that has several
    hidden: mx.array  # [1, L, H'] its hidden input
    tokens: list[int]  # the L tokens after those positions
    cache: object
    offers: tuple | None = None  # (offered [1, L], match lengths [1, L]) when the layer reads them

    def run(self, model) -> tuple[mx.array, mx.array]:
        """By itself: (logits [1, V] of the last position, block output [1, L, H])."""
        return self.layer.draft(self.hidden, mx.array([self.tokens]), self.cache, model, self.offers)


def run(model, forward: Forward, alone: bool = True) -> Ran:
    """One Forward through the target by itself."""
    out = model(mx.array([forward.tokens]), cache=forward.cache)
    hidden = forward.tap.hidden(forward.source) if forward.source is not None else None
    if forward.logits == "none":  # the logits are never computed
        mx.eval([c.state for c in forward.cache])
        return Ran(None, hidden, alone)
    return Ran(out[:, -1, :] if forward.logits == "last" else out[0], hidden, alone)


def drain(model, steps: Generator):
    """Runs a coroutine that yields only Forwards and DraftCalls; returns what it returns."""
    reply = None
    while True:
        try:
            asked = steps.send(reply)
        except StopIteration as done:
            return done.value
        reply = asked.run(model) if isinstance(asked, DraftCall) else run(model, asked)


def alone(model, steps: Generator) -> Iterator:
    """The records of one sequence run by itself."""
    reply = None
    try:
        while True:
            try:
                item = steps.send(reply)
            except StopIteration:
                return
            if isinstance(item, Forward):
                reply = run(model, item)
            elif isinstance(item, DraftCall):
                reply = item.run(model)
            elif isinstance(item, Planned):
                reply = item.plan.k
            else:
                reply = None
                yield item
    finally:
        steps.close()

"""A forward split over ranks: rank 0's stand-ins for the layers it does not run, and the other
ranks' loop that runs their layers on what rank 0 sends (daemon.cluster.wire).

Rank 0 runs the engine unchanged: its caches, forwards and rollbacks are the ones a single process
uses. What runs elsewhere is hidden behind the layers:
- pipeline: rank 0 holds the last layers (mlx-lm's split), and the slots of the others are
  `Remote` layers with `RemoteKV` caches that hold only a length. The last slot sends the
  forward down the pipeline (rank size-1 runs the first layers, then size-2, ..., rank 1) and
  takes the hidden states back. So the final hidden state, the LM head and the drafter are on
  rank 0, and a verification of k drafts is one trip through the pipeline for its k + 1 rows.
- tensor: every rank holds its share of every layer's heads (mlx-lm's `shard`); rank 0's first
  layer first sends the forward's input to the others, and every layer sums its shares with
  theirs (`all_sum`).
Each forward is evaluated to its end before the next is sent (`_trailing`), so the ranks' sends and
sums always meet in the same order.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from daemon.cluster import wire
from daemon.cluster.wire import FORWARD, QUIT, RAGGED, Message, Row


class Link:
    """Rank 0's end of the group: numbers the caches the ranks hold and remembers those dropped."""

    def __init__(self, group, split: str):
        self.group, self.split, self.size = group, split, group.size()
        self._rids = itertools.count(1)
        self._freed: list[int] = []

    def rid(self, cache) -> int:
        """A number for `cache`; the ranks drop theirs once rank 0 has dropped it."""
        rid = next(self._rids)
        weakref.finalize(cache, self._dropped, rid)
        return rid

    def _dropped(self, rid: int) -> None:
        self._freed.append(rid)

    def _message(self, op: int, rows: list[Row], h: mx.array, mask=None, record=()) -> Message:
        freed, self._freed = self._freed, []
        return Message(op, rows, h, mask, freed, list(record), h.shape[-1])

    def through(self, op: int, rows: list[Row], h: mx.array, slots: list, mask=None) -> mx.array:
        """Pipeline: the hidden states after the other ranks' layers, whose `slots` (rank 0's
        stand-ins) are given the outputs of the blocks a drafter reads."""
        record = [i for i, slot in enumerate(slots) if getattr(type(slot), "records", False)]
        wire.send(self._message(op, rows, h, mask, record), self.size - 1, self.group)
        width = h.shape[-1]
        out = mx.distributed.recv((*h.shape[:-1], width * (1 + len(record))), h.dtype, 1, group=self.group)
        mx.eval(out)
        for j, i in enumerate(record, 1):
            object.__setattr__(slots[i], "_out", out[..., j * width : (j + 1) * width])
        return out[..., :width] if record else out

    def broadcast(self, op: int, rows: list[Row], h: mx.array, mask=None) -> None:
        """Tensor: the forward's input to every other rank."""
        message = self._message(op, rows, h, mask)
        for rank in range(1, self.size):
            wire.send(message, rank, self.group)

    def close(self) -> None:
        """Tells the other ranks to stop."""
        for rank in ([self.size - 1] if self.split == "pipeline" else range(1, self.size)):
            wire.send(Message(QUIT), rank, self.group)


class RemoteKV(KVCache):
    """The cache of a layer another rank runs: rank 0 keeps its length (offset) only; the rank holds
    the keys and values under `rid` (set on the last slot of the range)."""

    ragged_rows = True  # a batch's rows go on to the rank as they are (daemon.engine.ragged)

    def __init__(self, link: Link | None = None):
        super().__init__()
        self.rid = link.rid(self) if link is not None else None

    @property
    def state(self):
        return []

    @state.setter
    def state(self, v):
        raise ValueError("a cache of layers on another rank cannot be restored from a copy")


class Remote(nn.Module):
    """The slot of a layer another rank runs (pipeline split); it keeps the layer's plain flags
    (llama's `use_sliding`, ...), which the model's forward reads."""

    ragged_rows = True  # `ragged` below: a batch's rows in one trip (daemon.engine.ragged)

    def __init__(self, link: Link, layer: nn.Module, slots: list | None = None):
        """`slots`: on the last slot of the range, all of them (it does the trip for them)."""
        super().__init__()
        for name, value in vars(layer).items():
            if isinstance(value, (bool, int, float, str)) and not name.startswith("_"):
                object.__setattr__(self, name, value)
        object.__setattr__(self, "_link", link)  # not child modules
        object.__setattr__(self, "_slots", slots)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        offset, cache.offset = cache.offset, cache.offset + x.shape[1]
        if self._slots is None:
            return x
        return self._link.through(FORWARD, [Row(cache.rid, offset, 0, x.shape[1])], x, self._slots, mask)

    def ragged(self, x: mx.array, positions: mx.array, bounds, caches) -> mx.array:
        rows = [Row(c.rid, c.offset, s, e) for (s, e), c in zip(bounds, caches)]
        for (s, e), c in zip(bounds, caches):
            c.offset += e - s
        return self._link.through(RAGGED, rows, x, self._slots) if self._slots is not None else x


class TrackedKV(KVCache):
    """A real KV cache whose sequence the other ranks know by `rid` (tensor split)."""

    def __init__(self, link: Link):
        super().__init__()
        self.rid = link.rid(self)


@functools.cache
def _leading(cls: type) -> type:
    """The first block of a tensor split: sends the forward's input to the other ranks first."""

    class Leading(cls):
        def __call__(self, x, mask=None, cache=None):
            self._link.broadcast(FORWARD, [Row(cache.rid, cache.offset, 0, x.shape[1])], x, mask)
            return super().__call__(x, mask, cache)

    return Leading


@functools.cache
def _trailing(cls: type) -> type:
    """The last block of a tensor split: its forward is evaluated at once (see the module's docstring)."""

    class Trailing(cls):
        def __call__(self, *args, **kwargs):
            out = super().__call__(*args, **kwargs)
            mx.eval(out)
            return out

    return Trailing


def lockstep(layers: list, link: Link) -> None:
    """Rank 0's blocks of a tensor split, in place."""
    first, last = layers[0], layers[-1]
    first.__class__ = _leading(type(first))
    object.__setattr__(first, "_link", link)
    last.__class__ = _trailing(type(last))


class Follower:
    """A rank other than 0: runs its layers on every forward rank 0 sends, until told to stop."""

    def __init__(self, group, layers: list, split: str, start: int = 0):
        """layers: this rank's blocks, the model's `start`-th first."""
        self.group, self.layers, self.split, self.start = group, layers, split, start
        self.rank, self.size = group.rank(), group.size()
        self.caches: dict[int, list[KVCache]] = {}

    def serve(self) -> None:
        src = 0 if self.split == "tensor" else (self.rank + 1) % self.size
        while True:
            m = wire.recv(src, self.group)
            downstream = self.split == "pipeline" and self.rank > 1
            if m.op == QUIT:
                if downstream:
                    wire.send(m, self.rank - 1, self.group)
                return
            h = self.forward(m)
            if self.split == "tensor":
                mx.eval(h)  # its sums with the other ranks
            elif downstream:
                wire.send(replace(m, h=h), self.rank - 1, self.group)
            else:
                mx.eval(mx.distributed.send(h, 0, group=self.group))

    def forward(self, m: Message) -> mx.array:
        for rid in m.freed:
            self.caches.pop(rid, None)
        caches = [self._cache(row) for row in m.rows]
        width = m.width or m.h.shape[-1]
        h, recorded = m.h[..., :width], [m.h[..., width:]] if m.h.shape[-1] > width else []
        if m.op == RAGGED:
            positions = mx.array([r.offset + j for r in m.rows for j in range(r.end - r.start)])
            bounds = [(r.start, r.end) for r in m.rows]
        for i, layer in enumerate(self.layers):
            if m.op == FORWARD:
                h = layer(h, m.mask, cache=caches[0][i])
            else:
                h = layer.ragged(h, positions, bounds, [c[i] for c in caches])
            if self.start + i in m.record:
                recorded.append(h)
        return mx.concatenate([h, *recorded], axis=-1) if recorded else h

    def _cache(self, row: Row) -> list[KVCache]:
        """The sequence's caches, at the length rank 0 holds (positions it took back are dropped)."""
        caches = self.caches.setdefault(row.rid, [KVCache() for _ in self.layers])
        held = caches[0].offset
        if held < row.offset:
            raise RuntimeError(f"cache {row.rid} holds {held} positions, rank 0 {row.offset}: the ranks are out of step")
        for c in caches:
            c.trim(held - row.offset)
        return caches

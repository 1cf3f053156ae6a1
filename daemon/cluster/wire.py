"""What rank 0 sends the other ranks for a forward, over mx.distributed's send / recv.

A message is three arrays, sent in order: a fixed header, the metadata (int32) and the hidden
states the ranks run their layers on. The metadata names the caches: each sequence's row range in
the hidden states, and the cache (`rid`, rank 0's number for it) at the length rank 0 holds for
it, so a rank trims what rank 0 took back (a rejected draft) before writing; the caches rank 0 has
dropped since the last message, which the ranks drop too; and the blocks whose outputs a drafter
reads (its feature layers), which go back appended to the hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

FORWARD, RAGGED, QUIT = 1, 2, 3  # a layer(h, mask, cache) call; FastBlock.ragged over sequences; the end
MASKS = (None, "causal")
DTYPES = (mx.float32, mx.bfloat16, mx.float16)
HEADER = 6  # op, rows, width, dtype, mask, metadata length


@dataclass(frozen=True)
class Row:
    rid: int  # the sequence's cache, as rank 0 numbers it
    offset: int  # positions the cache holds before these rows
    start: int  # the sequence's rows in the hidden states: [start, end)
    end: int


@dataclass
class Message:
    op: int
    rows: list[Row] = field(default_factory=list)
    h: mx.array | None = None  # [1, N, H]
    mask: str | None = None
    freed: list[int] = field(default_factory=list)
    record: list[int] = field(default_factory=list)  # blocks whose outputs come back after h's own width
    width: int = 0  # h's own width (the model's hidden size); what follows it in h are recorded outputs


def _meta(m: Message) -> list[int]:
    return [m.width, len(m.freed), *m.freed, len(m.record), *m.record,
            *(v for r in m.rows for v in (r.rid, r.offset, r.start, r.end))]


def send(m: Message, dst: int, group) -> None:
    """Sends `m` to rank `dst`; returns once it has gone."""
    if m.mask not in MASKS:
        raise ValueError("a cluster forward takes causal masks only (no sliding windows or array masks)")
    meta = _meta(m)
    h = m.h if m.h is not None else mx.zeros((1, 0, 0))
    header = [m.op, h.shape[1], h.shape[2], DTYPES.index(h.dtype) if m.h is not None else 0, MASKS.index(m.mask), len(meta)]
    for part in (mx.array(header, dtype=mx.int32), mx.array(meta, dtype=mx.int32), h):
        if part.size:
            mx.eval(mx.distributed.send(part, dst, group=group))


def recv(src: int, group) -> Message:
    """The next message from rank `src` (its hidden states still lazy: evaluated with the layers)."""
    op, n, width, dtype, mask, length = mx.distributed.recv((HEADER,), mx.int32, src, group=group).tolist()
    meta = mx.distributed.recv((length,), mx.int32, src, group=group).tolist() if length else []
    h = mx.distributed.recv((1, n, width), DTYPES[dtype], src, group=group) if n else None
    if not meta:
        return Message(op, h=h, mask=MASKS[mask])
    width, n_freed = meta[0], meta[1]
    freed, n_record = meta[2 : 2 + n_freed], meta[2 + n_freed]
    record, rest = meta[3 + n_freed : 3 + n_freed + n_record], meta[3 + n_freed + n_record :]
    rows = [Row(*rest[i : i + 4]) for i in range(0, len(rest), 4)]
    return Message(op, rows, h, MASKS[mask], freed, record, width)

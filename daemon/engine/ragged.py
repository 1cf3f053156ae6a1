"""Several sequences' rows in one target forward: ragged batching, each sequence on its own cache.

The rows of every sequence in a step (a decode row, a verification's 1 + k rows, a prefill chunk)
are laid end to end as one input [1, N]. Everything but attention (norms, projections, the MLP) runs
once over all N rows, which is where the weights are read, and so does the LM head over every row
whose logits are wanted; attention runs per sequence, on its own KV cache at its own offset. So each
sequence contributes exactly its own rows: no padding to the longest, no shared write index.
mlx-lm's BatchKVCache does not fit speculation per sequence: its sequences share one write index
(`_idx`), so every step would write the same number of rows for each (padded to the longest draft)
and `trim` takes the same number back from all, while a verification rejects a different number of
rows in each sequence.

The drafter's forwards of a step's drafting sequences run the same way (`run_drafts`), one per
draft position: a drafter whose block is a FastBlock on plain KV caches.

Only models whose blocks are Llama's (mlx-lm's `llama.TransformerBlock`, which loading turns into
daemon.cpu.fast_block's FastBlock: `FastBlock.ragged`) with plain KV caches run this way; others run
their sequences' forwards one after another in the same step (`batchable`). So do the stand-ins of
blocks another rank runs (daemon.cluster.stage), which send the rows on.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from daemon.cpu.fast_block import FastBlock, row_bounds
from daemon.engine.rows import DraftCall, Forward, Ran
from daemon.models.target import language_model, target_head, trunk


def batchable(model) -> bool:
    """Whether the model's sequences can share a forward: Llama blocks (or their stand-ins on rank
    0 of a cluster) on plain KV caches."""
    body = trunk(model)
    return (
        language_model(model) is model and "embed_tokens" in body
        and all(isinstance(layer, FastBlock) or getattr(type(layer), "ragged_rows", False) for layer in body.layers)
        and all(type(c) is KVCache or getattr(type(c), "ragged_rows", False) for c in make_prompt_cache(model))
    )


def run_ragged(model, forwards: list[Forward]) -> list[Ran]:
    """The Forwards of several sequences through the target in one pass; a Ran for each."""
    body = trunk(model)
    bounds = row_bounds(len(f.tokens) for f in forwards)
    offsets = [f.cache[0].offset for f in forwards]
    positions = mx.array([o + j for o, f in zip(offsets, forwards) for j in range(len(f.tokens))])
    h = body.embed_tokens(mx.array([[t for f in forwards for t in f.tokens]]))
    for i, layer in enumerate(body.layers):
        h = layer.ragged(h, positions, bounds, [f.cache[i] for f in forwards])
        if getattr(type(layer), "records", False):  # a drafter reads this block's output (daemon.engine.forward)
            object.__setattr__(layer, "_out", h)
    h = body.norm(h)
    source = next((f.source for f in forwards if f.source is not None), None)
    hidden = next(f.tap for f in forwards if f.source is not None).hidden(source) if source is not None else None
    wanted = [list(range(e - 1, e)) if f.logits == "last" else list(range(s, e)) if f.logits == "all" else []
              for f, (s, e) in zip(forwards, bounds)]
    picked = [i for rows in wanted for i in rows]
    logits = target_head(model)(h[:, mx.array(picked)])[0] if picked else None  # the head's weights read once
    out, start = [], 0
    for f, (s, e), rows in zip(forwards, bounds, wanted):
        seen = hidden[:, s:e] if f.source is not None else None
        out.append(Ran(logits[start : start + len(rows)] if rows else None, seen, alone=False))
        start += len(rows)
    filled = [c.state for f in forwards if f.logits == "none" for c in f.cache]
    if filled:
        mx.eval(filled)
    return out


def _plain(cache) -> bool:
    """Whether a drafter's cache (one, or a block drafter's per layer) is plain KV caches alone."""
    return all(type(c) is KVCache for c in (cache if isinstance(cache, list) else [cache]))


def run_drafts(model, calls: list[DraftCall]) -> list[tuple[mx.array, mx.array]]:
    """Each call's (logits [1, V], block output [1, L, H]): the calls to one drafter (layer) in one
    forward where it allows (`MTPDrafter.ragged`, `BlockDrafter.ragged`; plain KV caches), the others one by one."""
    replies: list = [None] * len(calls)
    groups: dict[int, list[int]] = {}
    for i, call in enumerate(calls):
        groups.setdefault(id(call.layer), []).append(i)
    for members in groups.values():
        layer = calls[members[0]].layer
        if len(members) > 1 and getattr(layer, "ragged", False) and all(_plain(calls[i].cache) for i in members):
            for i, reply in zip(members, layer.draft_ragged([calls[i] for i in members], model)):
                replies[i] = reply
        else:
            for i in members:
                replies[i] = calls[i].run(model)
    return replies

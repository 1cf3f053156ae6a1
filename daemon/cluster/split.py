"""How the target's layers are shared out over the ranks, on rank 0 and on the others."""

from __future__ import annotations

import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.models.cache import KVCache, make_prompt_cache

from daemon.cluster.stage import Link, Remote, RemoteKV, TrackedKV, lockstep
from daemon.cpu.fast_block import FastBlock
from daemon.models.target import trunk

SPLITS = ("pipeline", "tensor")


def pipeline_ranges(n_layers: int, size: int) -> list[tuple[int, int]]:
    """Each rank's layers [start, end), as mlx-lm's PipelineMixin splits them: evenly (the low ranks
    take the extra ones), rank r running the layers after those of ranks r+1 .. size-1, so rank 0
    holds the last layers and the final hidden state."""
    if n_layers < size:
        raise ValueError(f"{n_layers} layers cannot be shared out over {size} ranks")
    base, extra = divmod(n_layers, size)
    counts = [base + (r < extra) for r in range(size)]
    return [(sum(counts[r + 1 :]), sum(counts[r:])) for r in range(size)]


def check(model, split: str, size: int) -> None:
    """Refuses what the split cannot run, before any rank commits to it."""
    kinds = {type(c).__name__ for c in make_prompt_cache(model)}
    if kinds != {"KVCache"}:
        raise ValueError(f"a cluster runs models with plain attention caches for now, not {sorted(kinds)}")
    if split == "tensor":
        if not hasattr(model, "shard"):
            raise ValueError(f"mlx-lm has no tensor split for {type(model).__module__}: use --split pipeline")
        attn = trunk(model).layers[0].self_attn
        heads = (attn.n_heads, attn.n_kv_heads)
        if any(n % size for n in heads):
            raise ValueError(f"{heads[0]} query and {heads[1]} KV heads do not divide over {size} ranks: "
                             "use --split pipeline or another number of hosts")


def _plain(layers: list) -> None:
    """FastBlocks back to mlx-lm's block (its compiled halves cannot hold a sum over the ranks)."""
    for layer in layers:
        if isinstance(layer, FastBlock):
            layer.__class__ = llama.TransformerBlock
            object.__setattr__(layer, "_row_major", None)


def split_rank0(model, link: Link) -> tuple[int, int]:
    """Rank 0's share, in place; returns its layers [start, end)."""
    layers = trunk(model).layers
    n = len(layers)
    if link.split == "tensor":
        _plain(layers)
        model.shard(link.group)
        lockstep(layers, link)
        model.make_cache = lambda: [TrackedKV(link), *(KVCache() for _ in range(n - 1))]
        return 0, n
    start, end = pipeline_ranges(n, link.size)[0]
    slots: list = []
    for i in range(start):
        slots.append(Remote(link, layers[i], slots if i == start - 1 else None))
        layers[i] = slots[-1]
    model.make_cache = lambda: [*(RemoteKV(link if i == start - 1 else None) for i in range(start)),
                                *(KVCache() for _ in range(start, n))]
    return start, end


def split_follower(model, group, split: str) -> tuple[list[nn.Module], int, int]:
    """A follower's share: its blocks (the rest of the model is dropped with `model`), [start, end)."""
    layers = trunk(model).layers
    if split == "tensor":
        _plain(layers)
        model.shard(group)
        return list(layers), 0, len(layers)
    start, end = pipeline_ranges(len(layers), group.size())[group.rank()]
    return list(layers[start:end]), start, end


def nbytes(modules) -> int:
    """The bytes of the modules' parameters."""
    return sum(v.nbytes for m in modules for _, v in tree_flatten(m.parameters()))

"""Training a block drafter (`mtpd train-drafter --kind block`): DSpark's anchored blocks.

A training sequence's taps give every layer its context keys and values once (positions 0..L-1).
Anchors p are drawn among the answer's positions; each anchor's block [t_p, mask x (B - 1)] runs at
positions p .. p + B - 1 over the context before p and its own rows, as a block is drafted when t_p
is the last token (deepspec/modeling/dspark/common.py, create_dspark_attention_mask), all blocks
of all sequences of a batch in one forward. Row j learns the target's greedy token at p + j + 1
(its argmax at p + j), weighted exp(-j / DECAY) (DeepSpec's loss_decay_gamma): every later row's
acceptance rests on the early ones.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from daemon.training.settings import CATEGORIES

DECAY = 4.0


def draw_anchors(f: dict, rows: np.ndarray, count: int, rng: np.random.Generator | None) -> np.ndarray:
    """[len(rows), count] anchor positions, -1 where a sequence has fewer: positions p >= 1 (a
    context before it) whose next token belongs to the answer and exists. `rng` None: evenly
    spaced (evaluation)."""
    out = np.full((len(rows), count), -1, np.int64)
    for r, row in enumerate(rows):
        valid = np.arange(max(1, int(f["starts"][row]) - 1), int(f["lengths"][row]) - 1)
        if rng is None:
            picked = valid[np.linspace(0, len(valid) - 1, min(count, len(valid))).astype(int)] if len(valid) else valid
        else:
            picked = np.sort(rng.choice(valid, size=min(count, len(valid)), replace=False))
        out[r, : len(picked)] = picked
    return out


def block_batch(f: dict, rows: np.ndarray, anchors: np.ndarray, size: int, mask_token: int):
    """(taps [R, L, W], block tokens [R, N * B], each block row's position [R, N * B], each row's
    anchor [R, N * B] (-1: padding), labels [R, N * B] (full vocabulary), where a label counts
    [R, N * B])."""
    tokens, lengths, starts = f["tokens"][rows], f["lengths"][rows], f["starts"][rows]
    p = np.maximum(anchors, 0)
    block = np.full((*anchors.shape, size), mask_token, np.int32)
    block[..., 0] = np.take_along_axis(tokens, p, axis=1)
    position = p[..., None] + np.arange(size)
    width = tokens.shape[1]
    labels = np.take_along_axis(f["argmax"][rows], np.minimum(position, width - 1).reshape(len(rows), -1), axis=1)
    counts = ((anchors[..., None] >= 0) & (position <= lengths[:, None, None] - 2)
              & (position + 1 >= starts[:, None, None]))
    anchor = np.broadcast_to(anchors[..., None], position.shape)
    flat = [a.reshape(len(rows), -1) for a in (block, position, anchor, counts)]
    taps = mx.array(f["hidden"][rows]).astype(mx.float32)
    return taps, mx.array(flat[0]), mx.array(flat[1]), mx.array(flat[2]), mx.array(labels), mx.array(flat[3])


def _at_rows(rope, x: mx.array, positions: mx.array) -> mx.array:
    """RoPE of x [R, n, heads, D] with each row at its own position [R, n]: [R, heads, n, D]."""
    r, n, heads, d = x.shape
    out = rope(x.reshape(r * n, heads, 1, d), offset=positions.reshape(-1))
    return out.reshape(r, n, heads, d).transpose(0, 2, 1, 3)


def block_states(drafter, target, taps, block, position, anchor) -> mx.array:
    """Every block's rows after the final norm [R, N * B, H]: the teacher-forced form of
    BlockDrafter.__call__, each block seeing the context before its anchor and its own rows."""
    r, length = taps.shape[:2]
    n, size = block.shape[1], drafter.config.block_size
    context = drafter.context(taps)
    x = drafter.block_input(block, mx.take_along_axis(context, mx.maximum(anchor - 1, 0)[..., None], axis=1), target)
    group = mx.arange(n) // size
    sees = mx.concatenate([mx.arange(length)[None, None] < anchor[..., None],
                           mx.broadcast_to(group[:, None] == group[None], (r, n, n))], axis=-1)[:, None]
    for layer in drafter.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        queries = _at_rows(drafter.rope, attn.q_norm(attn.q_proj(h).reshape(r, n, attn.n_heads, -1)), position)
        keys = _at_rows(drafter.rope, attn.k_norm(attn.k_proj(h).reshape(r, n, attn.n_kv, -1)), position)
        values = attn.v_proj(h).reshape(r, n, attn.n_kv, -1).transpose(0, 2, 1, 3)
        context_keys, context_values = attn._keys(context)
        keys = mx.concatenate([drafter.rope(context_keys), keys], axis=2)
        values = mx.concatenate([context_values, values], axis=2)
        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=attn.scale, mask=sees)
        x = x + attn.o_proj(out.transpose(0, 2, 1, 3).reshape(r, n, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return drafter.norm(x)


def block_loss_fn(drafter, target, taps, block, position, anchor, labels, counts):
    """Cross-entropy of every counted row against the target's greedy token (labels: head indices,
    -1 outside the head), row j of a block weighted exp(-j / DECAY)."""
    logits = drafter.head_logits(block_states(drafter, target, taps, block, position, anchor), target)
    row = mx.arange(block.shape[1]) % drafter.config.block_size
    weight = mx.exp(-row.astype(mx.float32) / DECAY)[None] * (counts & (labels >= 0))
    ce = nn.losses.cross_entropy(logits, mx.maximum(labels, 0), reduction="none")
    return (ce * weight).sum() / mx.maximum(weight.sum(), 1e-6)


def evaluate_blocks(drafter, lm, f: dict, rows: np.ndarray, batch: int, anchors: int = 48) -> dict:
    """Teacher-forced greedy acceptance of the block drafter on `rows`, from evenly spaced anchors:
    per category, the rate at each block row given the rows before it accepted, and the accepted
    length per block (drafts, the target's own token not counted)."""
    size, config = drafter.config.block_size, drafter.config
    vocab_map = mx.array(config.head_vocab) if config.head_vocab else None
    tried, passed = np.zeros((len(CATEGORIES), size)), np.zeros((len(CATEGORIES), size))
    blocks, accepted = np.zeros(len(CATEGORIES)), np.zeros(len(CATEGORIES))
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        taps, block, position, anchor, labels, counts = block_batch(f, part, draw_anchors(f, part, anchors, None), size,
                                                                    config.mask_token_id)
        best = mx.argmax(drafter.head_logits(block_states(drafter, lm.model, taps, block, position, anchor), lm.model), axis=-1)
        if vocab_map is not None:
            best = vocab_map[best]
        right = np.array((best == labels) & counts).reshape(len(part), -1, size)
        counted = np.array(counts).reshape(len(part), -1, size)
        run = np.cumprod(right, axis=-1)  # accepted up to and including each row
        before = np.concatenate([np.ones_like(run[..., :1]), run[..., :-1]], axis=-1) & counted
        for i, row in enumerate(part):
            c = f["category"][row]
            tried[c] += before[i].sum(axis=0)
            passed[c] += run[i].sum(axis=0)
            full = counted[i, :, 0]
            blocks[c] += full.sum()
            accepted[c] += run[i][full].sum()
    named = {name: i for i, name in enumerate(CATEGORIES) if blocks[i]}
    totals = {name: (tried[i], passed[i], blocks[i], accepted[i]) for name, i in named.items()}
    totals["all"] = (tried.sum(axis=0), passed.sum(axis=0), blocks.sum(), accepted.sum())
    return {name: {"by_position": [round(float(p / t), 4) if t else None for p, t in zip(ps, ts)],
                   "accepted_per_block": round(float(a / max(n, 1)), 3)} for name, (ts, ps, n, a) in totals.items()}

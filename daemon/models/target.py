"""The parts of a target model a drafter shares (its embedding and its LM head) and the trunk they
sit on, whatever the family nests them in (`language_model` in Qwen3.5 and Gemma 3, `backbone` in
Nemotron-H)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class SharedHead(nn.Module):
    """A drafter's head: its norm, and its own projection when it ships one (else the target's is used)."""

    def __init__(self, hidden: int, eps: float, vocab: int | None):
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=eps)
        if vocab is not None:
            self.head = nn.Linear(hidden, vocab, bias=False)


def language_model(model) -> nn.Module:
    """The module holding the head: the model itself, or its `language_model`."""
    return model.language_model if "language_model" in model else model


def trunk(model) -> nn.Module:
    """The decoder stack (embedding, layers, final norm)."""
    lm = language_model(model)
    return lm.backbone if "backbone" in lm else lm.model


def target_embedding(model) -> nn.Module:
    body = trunk(model)
    return body.embed_tokens if "embed_tokens" in body else body.embeddings


def target_head(model):
    """The target's LM head as a function of post-norm hidden states."""
    layer = target_head_layer(model)
    return layer if "lm_head" in language_model(model) else layer.as_linear


def target_head_layer(model) -> nn.Module:
    """The layer holding the target's head: `lm_head`, or the tied embedding."""
    lm = language_model(model)
    return lm.lm_head if "lm_head" in lm else target_embedding(model)


def target_head_weight(model) -> mx.array:
    """The target's head as a [V, H] matrix (dequantized if it is quantized)."""
    layer = target_head_layer(model)
    if hasattr(layer, "scales"):
        return mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    return layer.weight


def head_rows(holder, target, vocab_map: mx.array, column_major: bool = False) -> mx.array:
    """The target's head rows for a drafter's reduced vocabulary [len(vocab_map), H], made once
    per target and kept on `holder` (as `_subset_head`; `column_major`: daemon.cpu.layout)."""
    kept = getattr(holder, "_subset_head", None)
    if kept is None or kept[0] is not target:
        from daemon.cpu.layout import column_major_matrix

        rows = target_head_weight(target)[vocab_map]
        rows = column_major_matrix(rows) if column_major else mx.contiguous(rows)
        mx.eval(rows)
        object.__setattr__(holder, "_subset_head", (target, rows))
    return holder._subset_head[1]


def full_vocab(logits: mx.array, vocab_map: mx.array | None, vocab: int) -> mx.array:
    """A reduced vocabulary's logits scattered back into the full one, the others impossible."""
    if vocab_map is None:
        return logits
    full = mx.full((*logits.shape[:-1], vocab), -mx.inf, logits.dtype)
    return mx.put_along_axis(full, mx.broadcast_to(vocab_map, logits.shape), logits, axis=-1)

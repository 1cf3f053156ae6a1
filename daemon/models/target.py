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

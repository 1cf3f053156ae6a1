"""The parts of a target model a drafter shares: its embedding and its LM head."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def target_embedding(model) -> nn.Module:
    return model.model.embed_tokens


def target_head(model):
    """The target's LM head as a function of post-norm hidden states."""
    layer = target_head_layer(model)
    return layer if "lm_head" in model else layer.as_linear


def target_head_layer(model) -> nn.Module:
    """The layer holding the target's head: `lm_head`, or the tied embedding."""
    return model.lm_head if "lm_head" in model else model.model.embed_tokens


def target_head_weight(model) -> mx.array:
    """The target's head as a [V, H] matrix (dequantized if it is quantized)."""
    layer = target_head_layer(model)
    if hasattr(layer, "scales"):
        return mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    return layer.weight



"""Load a llama-family GGUF file into mlx-lm's llama model.

MLX reads GGUF itself (`mx.load`): quantized tensors arrive as affine triples (`weight` uint32,
`scales`, `biases`, group size 32) whose bit width differs per tensor. On Metal they stay quantized;
on a CPU they are dequantized to fp32, the only precision MLX's CPU backend runs fast.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama

from daemon.models.tokenizer import tokenizer_from_gguf

GROUP_SIZE = 32
_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _num(meta: dict, key: str, default=None):
    value = meta.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"GGUF metadata lacks {key}")
        return default
    return value.item() if hasattr(value, "item") else value


def llama_config(meta: dict, has_output: bool) -> dict:
    """mlx-lm llama config from GGUF metadata. RoPE is traditional: the GGUF converter permutes q/k."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}: only the llama family")
    hidden = int(_num(meta, "llama.embedding_length"))
    heads = int(_num(meta, "llama.attention.head_count"))
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(_num(meta, "llama.block_count")),
        "intermediate_size": int(_num(meta, "llama.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_num(meta, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_num(meta, "llama.rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(_num(meta, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_num(meta, "llama.rope.freq_base", 10000.0)),
        "vocab_size": int(_num(meta, "llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "max_position_embeddings": int(_num(meta, "llama.context_length", 4096)),
        "rope_traditional": True,
        "tie_word_embeddings": not has_output,
    }


def rename(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    base, suffix = gguf_name.rsplit(".", 1)
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)", base):
        if m.group(2) in _BLOCK:
            return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{suffix}"
    elif base in _TOP:
        return f"{_TOP[base]}.{suffix}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def quantized_bits(weight: mx.array, scales: mx.array) -> int:
    """Bits per weight of an affine triple: 32-bit words hold 32/bits values, one scale per group."""
    return weight.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)


def load_gguf(path: str | Path, quantized: bool, lazy: bool = False) -> tuple[nn.Module, object, dict]:
    """Returns (model, tokenizer wrapper, config). `quantized=False` dequantizes to fp32. `lazy`:
    the weights are read (and converted) only when evaluated."""
    tensors, meta = mx.load(str(path), return_metadata=True)
    weights = {rename(k): v for k, v in tensors.items()}
    config = llama_config(meta, has_output="lm_head.weight" in weights)
    model = llama.Model(llama.ModelArgs.from_dict(config))

    bits = {
        name[: -len(".scales")]: quantized_bits(weights[name[: -len("scales")] + "weight"], w)
        for name, w in weights.items()
        if name.endswith(".scales")
    }
    if quantized:
        nn.quantize(
            model,
            class_predicate=lambda p, _: {"group_size": GROUP_SIZE, "bits": bits[p]} if p in bits else False,
        )
        weights = {k: v.astype(mx.float16) if v.dtype == mx.float32 else v for k, v in weights.items()}
    else:
        for prefix, b in bits.items():
            w, s, z = (weights.pop(f"{prefix}.{n}") for n in ("weight", "scales", "biases"))
            weights[f"{prefix}.weight"] = mx.dequantize(w, s, z, group_size=GROUP_SIZE, bits=b)
        weights = {k: v.astype(mx.float32) for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, tokenizer_from_gguf(meta), config

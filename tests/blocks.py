"""Tiny block drafters as released, and their reference forward.

The folders hold config.json and model.safetensors under the release's own names and fields:
DFlash as z-lab's `DFlashDraftModel` saves them (dflash/model.py; `dflash_config`), DSpark as
DeepSpec's `Qwen3DSparkModel` does (deepspec/modeling/dspark/qwen3/config.py build_draft_config,
modeling.py, markov_head.py). The reference is written from those files, not from daemon.models.block.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import create_attention_mask

from daemon.models.target import target_embedding, target_head_weight, trunk

LAYER = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
             rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=1024)


def _shapes(kind: str, vocab: int, layers: int, taps: int, markov: str | None, rank: int, confidence: bool,
            with_markov: bool) -> dict[str, tuple]:
    h, heads, kv, hd, inter = (LAYER[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                  "head_dim", "intermediate_size"))
    shapes = {"fc.weight": (h, taps * h), "hidden_norm.weight": (h,), "norm.weight": (h,)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * hd, h), p + "self_attn.k_proj.weight": (kv * hd, h),
            p + "self_attn.v_proj.weight": (kv * hd, h), p + "self_attn.o_proj.weight": (h, heads * hd),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    if kind == "dspark":
        shapes.update({"embed_tokens.weight": (vocab, h), "lm_head.weight": (vocab, h)})
        if markov:
            shapes.update({"markov_head.markov_w1.weight": (vocab, rank), "markov_head.markov_w2.weight": (vocab, rank)})
            if markov == "gated":
                shapes.update({"markov_head.gate_proj.weight": (rank, h + rank), "markov_head.gate_proj.bias": (rank,)})
            if markov == "rnn":
                shapes.update({"markov_head.joint_proj.weight": (3 * rank, 2 * rank + h),
                               "markov_head.joint_proj.bias": (3 * rank,)})
        if confidence:
            shapes.update({"confidence_head.proj.weight": (1, h + (rank if with_markov else 0)),
                           "confidence_head.proj.bias": (1,)})
    return shapes


def write_block_drafter(folder: Path, kind: str, vocab: int, target_layers: int, layer_ids: list[int],
                        block_size: int = 4, mask_token_id: int | None = None, layers: int = 2,
                        markov: str | None = None, rank: int = 8, confidence: bool = False, with_markov: bool = False,
                        seed: int = 0, top_level_block: bool = False) -> dict:
    """A released DFlash or DSpark folder with random weights; returns the weights (numpy arrays)
    and the fields, for the reference. `top_level_block`: an older DFlash config, block_size at the top."""
    rng = np.random.default_rng(seed)
    mask = vocab - 1 if mask_token_id is None else mask_token_id
    shapes = _shapes(kind, vocab, layers, len(layer_ids), markov, rank, confidence, with_markov)
    weights = {}
    for name, shape in shapes.items():
        if "norm" in name and len(shape) == 1:
            weights[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            scale = 0.3 if len(shape) == 1 else (9 if "markov_w" in name else 3) / np.sqrt(shape[-1])
            weights[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
    config = dict(LAYER, vocab_size=vocab, num_hidden_layers=layers, num_target_layers=target_layers,
                  model_type="qwen3", tie_word_embeddings=False, layer_types=["full_attention"] * layers)
    if kind == "dflash":
        config.update(architectures=["DFlashDraftModel"],
                      dflash_config={"mask_token_id": mask, "target_layer_ids": layer_ids})
        if top_level_block:
            config["block_size"] = block_size
        else:
            config["dflash_config"]["block_size"] = block_size
    else:
        config.update(architectures=["Qwen3DSparkModel"], block_size=block_size, mask_token_id=mask,
                      target_layer_ids=layer_ids, num_anchors=512, markov_rank=rank if markov else 0,
                      enable_confidence_head=confidence, attention_bias=False)
        if markov:
            config["markov_head_type"] = markov
        if confidence:
            config["confidence_head_with_markov"] = with_markov
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()})
    (folder / "config.json").write_text(json.dumps(config))
    return {"weights": weights, "kind": kind, "layer_ids": layer_ids, "block_size": block_size, "mask": mask,
            "markov": markov, "confidence": confidence, "with_markov": with_markov}


def _rms(x, w, eps=LAYER["rms_norm_eps"]):
    return x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps) * w


def reference_taps(lm, ids: list[int], layer_ids: list[int]) -> mx.array:
    """HF's hidden_states as DeepSpec's extract_context_feature picks them: -1 the embedding
    output, i the output of decoder layer i; concatenated in the given order. [1, L, taps * H]"""
    body = trunk(lm.model)
    h = body.embed_tokens(mx.array([ids]))
    states = [h]
    mask = create_attention_mask(h, None)
    for layer in body.layers:
        h = layer(h, mask, None)
        states.append(h)
    return mx.concatenate([states[0 if i == -1 else i + 1] for i in layer_ids], axis=-1)


def reference_block(ref: dict, lm, taps: mx.array, block: list[int]) -> tuple[mx.array, mx.array]:
    """The drafter over the whole context at once (positions 0..S-1, no cache) and the block after
    it: Qwen3DSparkAttention / DFlashAttention (keys and values of cat(context, block), RoPE at
    their positions, no mask), residual layers, final norm. Returns (the proposal rows' states
    [P, H], their logits [P, V] before any Markov head)."""
    w = {k: mx.array(v) for k, v in ref["weights"].items()}
    heads, kv, hd = LAYER["num_attention_heads"], LAYER["num_key_value_heads"], LAYER["head_dim"]
    context = _rms(taps @ w["fc.weight"].T, w["hidden_norm.weight"])
    s, b = context.shape[1], len(block)
    tokens = mx.array([block])
    x = w["embed_tokens.weight"][tokens] if ref["kind"] == "dspark" else target_embedding(lm.model)(tokens)
    layers = len({k.split(".")[1] for k in w if k.startswith("layers.")})

    def rope(t, offset):
        return mx.fast.rope(t, hd, traditional=False, base=LAYER["rope_theta"], scale=1.0, offset=offset)

    for i in range(layers):
        p = f"layers.{i}."
        xn = _rms(x, w[p + "input_layernorm.weight"])
        both = mx.concatenate([context, xn], axis=1)
        q = _rms((xn @ w[p + "self_attn.q_proj.weight"].T).reshape(1, b, heads, hd), w[p + "self_attn.q_norm.weight"])
        k = _rms((both @ w[p + "self_attn.k_proj.weight"].T).reshape(1, s + b, kv, hd), w[p + "self_attn.k_norm.weight"])
        v = (both @ w[p + "self_attn.v_proj.weight"].T).reshape(1, s + b, kv, hd)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        q, k = rope(q, s), rope(k, 0)
        k, v = mx.repeat(k, heads // kv, axis=1), mx.repeat(v, heads // kv, axis=1)
        attention = mx.softmax((q @ k.transpose(0, 1, 3, 2)) * hd**-0.5, axis=-1) @ v
        x = x + attention.transpose(0, 2, 1, 3).reshape(1, b, -1) @ w[p + "self_attn.o_proj.weight"].T
        xn = _rms(x, w[p + "post_attention_layernorm.weight"])
        gate = xn @ w[p + "mlp.gate_proj.weight"].T
        x = x + ((gate * mx.sigmoid(gate)) * (xn @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    h = _rms(x, w["norm.weight"])[0, 1 if ref["kind"] == "dflash" else 0 :]
    head = w["lm_head.weight"] if ref["kind"] == "dspark" else target_head_weight(lm.model)
    return h, h @ head.T


def reference_markov(ref: dict, base: mx.array, h: mx.array, first: int) -> tuple[list[int], mx.array]:
    """DeepSpec's sample_block_tokens at temperature 0: each row's logits plus the Markov bias
    from the token before it (VanillaMarkov, GatedMarkovHead, RNNHead), argmax in order. Returns
    (the tokens, the corrected logits [P, V])."""
    w = {k: mx.array(v) for k, v in ref["weights"].items()}
    rank = w["markov_head.markov_w1.weight"].shape[1]
    state, previous, tokens, rows = mx.zeros((rank,)), first, [], []
    for i in range(base.shape[0]):
        e = w["markov_head.markov_w1.weight"][previous]
        if ref["markov"] == "gated":
            e = e * mx.sigmoid(mx.concatenate([h[i], e]) @ w["markov_head.gate_proj.weight"].T + w["markov_head.gate_proj.bias"])
        if ref["markov"] == "rnn":
            z = mx.concatenate([state, e, h[i]]) @ w["markov_head.joint_proj.weight"].T + w["markov_head.joint_proj.bias"]
            g, c, o = mx.split(z, 3)
            g = mx.sigmoid(g)
            state, e = g * state + (1 - g) * mx.tanh(c), mx.tanh(o)
        row = base[i] + w["markov_head.markov_w2.weight"] @ e
        rows.append(row)
        previous = int(mx.argmax(row).item())
        tokens.append(previous)
    return tokens, mx.stack(rows)

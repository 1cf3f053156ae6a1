"""Qwen3-Next (qwen3_next), Qwen3.5 / 3.6 (qwen3_5, qwen3_5_moe).

Reference: vLLM `vllm/model_executor/models/qwen3_next_mtp.py` (Qwen3NextMultiTokenPredictor.forward)
and transformers' Qwen3_5RMSNorm (`output * (1.0 + self.weight)`):
    x = fc([pre_fc_norm_embedding(embed(t_{i+1})); pre_fc_norm_hidden(h_i)])   # embedding first
    x = one full-attention decoder layer of the family (x)                     # MoE in the MoE models
    logits = lm_head(norm(x))                                                  # the target's head
Keys `mtp.*` (or `language_model.mtp.*`, `model.mtp.*`); mlx-lm's sanitize drops them. Checkpoints
as released store every RMSNorm weight zero-centred (applied as 1 + w): mlx-lm adds 1 to the
trunk's when it sees the released layout, and the MTP layer's norms get the same +1 then, and only
then (a conversion already carries 1 + w). h_i after the final norm. Layers past the first are ignored.
"""

from __future__ import annotations

import re

import mlx.core as mx

FAMILIES = ("qwen3_next", "qwen3_5", "qwen3_5_moe")
COMBINE = "embedding_first"
FORWARD = {
    "hidden": "after the final norm",
    "combine": "fc([pre_fc_norm_embedding(e); pre_fc_norm_hidden(h)])",
    "norms": "RMSNorm, released zero-centred (1 + w)",
    "head": "the target's lm_head",
    "layers": "mtp.layers.{i} (mtp_num_hidden_layers)",
}
_KEY = re.compile(r"^(?:model\.)?(?:language_model\.)?mtp\.(.+)$")
LAYER = re.compile(r"^(?:model\.)?(?:language_model\.)?(mtp)\.")  # one MTP module (its fc and norms shared)
_TOP = {"fc": "eh_proj", "pre_fc_norm_embedding": "enorm", "pre_fc_norm_hidden": "hnorm", "norm": "shared_head.norm"}
_NORMS = ("enorm.weight", "hnorm.weight", "shared_head.norm.weight", "input_layernorm.weight",
          "post_attention_layernorm.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def is_mtp(key: str, config: dict) -> bool:
    return _KEY.match(key) is not None


def zero_centred(weights: dict, family: str) -> bool:
    """Whether the checkpoint is in the released layout, by mlx-lm's own test for it (sanitize)."""
    if family == "qwen3_next":
        return any(k.endswith(".mlp.experts.0.up_proj.weight") and not is_mtp(k, {}) for k in weights)
    return any("conv1d.weight" in k and v.shape[-1] != 1 for k, v in weights.items())


def convert(mtp: dict, weights: dict, config: dict, sanitize) -> list[dict]:
    out, experts = {}, {}
    for key, value in mtp.items():
        rest = _KEY.match(key).group(1)
        if rest.startswith("layers."):
            index, _, rest = rest.removeprefix("layers.").partition(".")
            if index != "0":
                continue
        else:
            head, _, tail = rest.partition(".")
            rest = f"{_TOP.get(head, head)}.{tail}"
        expert = _EXPERT.match(rest)
        if expert:
            experts.setdefault(expert.group(2), {})[int(expert.group(1))] = value
        elif rest == "mlp.experts.gate_up_proj":  # fused experts (Qwen3.5 MoE as released)
            mid = value.shape[-2] // 2
            out["mlp.switch_mlp.gate_proj.weight"] = value[..., :mid, :]
            out["mlp.switch_mlp.up_proj.weight"] = value[..., mid:, :]
        elif rest == "mlp.experts.down_proj":
            out["mlp.switch_mlp.down_proj.weight"] = value
        else:
            out[rest] = value
    for proj, by_index in experts.items():
        out[f"mlp.switch_mlp.{proj}.weight"] = mx.stack([by_index[e] for e in sorted(by_index)])
    if zero_centred(weights, config["model_type"]):
        out.update({k: out[k] + 1.0 for k in _NORMS if k in out})
    return [out]  # one module: its layers past the first (fc and norms shared with it) are not used


def block(config: dict, layer_index: int):
    """The family's full-attention layer (whatever `layer_index`: the MTP layer is never linear)."""
    if config["model_type"] == "qwen3_next":
        from mlx_lm.models import qwen3_next as m

        args = m.ModelArgs.from_dict(config)
        return m.Qwen3NextDecoderLayer(args, args.full_attention_interval - 1)
    from mlx_lm.models import qwen3_5 as m

    args = m.TextModelArgs.from_dict(config)
    return m.DecoderLayer(args, args.full_attention_interval - 1)

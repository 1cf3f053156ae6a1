"""MiMo-7B (mimo).

Reference: vLLM `vllm/model_executor/models/mimo_mtp.py` (MiMoMultiTokenPredictorLayer.forward):
    x = input_proj([hidden_layernorm(h_i); token_layernorm(embed(t_{i+1}))])   # hidden FIRST
    x = a Qwen2 decoder layer (x)
    logits = lm_head(final_layernorm(x))                                      # the target's head
Keys `model.mtp_layers.{i}.*` (mlx-lm's sanitize drops them); plain RMSNorm weights; h_i after the
final norm. Layers past the first are ignored.
"""

from __future__ import annotations

FAMILIES = ("mimo",)
COMBINE = "hidden_first"
FORWARD = {
    "hidden": "after the final norm",
    "combine": "input_proj([hidden_layernorm(h); token_layernorm(e)])",
    "norms": "RMSNorm (w)",
    "head": "the target's lm_head",
    "layers": "model.mtp_layers.{i}",
}
_NAMES = {"token_layernorm": "enorm", "hidden_layernorm": "hnorm", "input_proj": "eh_proj",
          "final_layernorm": "shared_head.norm"}


def is_mtp(key: str, config: dict) -> bool:
    return key.startswith("model.mtp_layers.")


def convert(mtp: dict, weights: dict, config: dict, sanitize) -> dict:
    out = {}
    for key, value in mtp.items():
        if not key.startswith("model.mtp_layers.0."):
            continue
        head, _, rest = key.removeprefix("model.mtp_layers.0.").partition(".")
        if "rotary_emb" in rest:
            continue
        out[f"{_NAMES.get(head, head)}.{rest}"] = value
    return out


def block(config: dict, layer_index: int):
    from mlx_lm.models import mimo

    return mimo.TransformerBlock(mimo.ModelArgs.from_dict(config))

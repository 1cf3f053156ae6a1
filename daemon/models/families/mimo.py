"""MiMo-7B (mimo).

Reference: vLLM `vllm/model_executor/models/mimo_mtp.py` (MiMoMultiTokenPredictorLayer.forward):
    x = input_proj([hidden_layernorm(h_i); token_layernorm(embed(t_{i+1}))])   # hidden FIRST
    x = a Qwen2 decoder layer (x)
    logits = lm_head(final_layernorm(x))                                      # the target's head
Keys `model.mtp_layers.{i}.*` (mlx-lm's sanitize drops them); plain RMSNorm weights; h_i after the
final norm. Several layers draft the later positions in turn (daemon.drafting.session).
"""

from __future__ import annotations

import re

FAMILIES = ("mimo",)
COMBINE = "hidden_first"
FORWARD = {
    "hidden": "after the final norm",
    "combine": "input_proj([hidden_layernorm(h); token_layernorm(e)])",
    "norms": "RMSNorm (w)",
    "head": "the target's lm_head",
    "layers": "model.mtp_layers.{i}",
}
LAYER = re.compile(r"^model\.mtp_layers\.(\d+)\.")
_NAMES = {"token_layernorm": "enorm", "hidden_layernorm": "hnorm", "input_proj": "eh_proj",
          "final_layernorm": "shared_head.norm"}


def is_mtp(key: str, config: dict) -> bool:
    return key.startswith("model.mtp_layers.")


def convert(mtp: dict, weights: dict, config: dict, sanitize) -> list[dict]:
    layers: dict[int, dict] = {}
    for key, value in mtp.items():
        index, _, rest = key.removeprefix("model.mtp_layers.").partition(".")
        head, _, rest = rest.partition(".")
        if "rotary_emb" not in rest:
            layers.setdefault(int(index), {})[f"{_NAMES.get(head, head)}.{rest}"] = value
    return [layers[i] for i in sorted(layers)]


def block(config: dict, layer_index: int):
    from mlx_lm.models import mimo

    return mimo.TransformerBlock(mimo.ModelArgs.from_dict(config))

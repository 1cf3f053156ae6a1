"""DeepSeek-V3 / R1, DeepSeek-V3.2, GLM-4.5/4.6 (glm4_moe), GLM-4.7-Flash (glm4_moe_lite).

Reference: vLLM `vllm/model_executor/models/deepseek_mtp.py` (DeepSeekMultiTokenPredictorLayer).
The MTP layer sits after the trunk at `model.layers.{num_hidden_layers}` (mlx-lm's sanitize drops it):
    x = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])   # embedding first; h_i after the final norm
    x = the family's decoder layer (x)                   # a MoE layer where the trunk's are
    logits = shared_head.head(shared_head.norm(x))       # head shipped again (equals lm_head)
Plain RMSNorm weights (w, not 1 + w). With num_nextn_predict_layers > 1 the layers at N + 1, ...
draft the later positions in turn (daemon.drafting.session).
"""

from __future__ import annotations

import re

FAMILIES = ("deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite")
COMBINE = "embedding_first"
ARRAY_MASK = True
FORWARD = {
    "hidden": "after the final norm",
    "combine": "eh_proj([enorm(e); hnorm(h)])",
    "norms": "RMSNorm (w)",
    "head": "shared_head.head (shipped with the layer)",
    "layers": "model.layers.{N+i}",
}
LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def layer_of(key: str) -> int | None:
    m = LAYER.match(key)
    return int(m.group(1)) if m else None


def is_mtp(key: str, config: dict) -> bool:
    layer = layer_of(key)
    return layer is not None and layer >= config["num_hidden_layers"]


def convert(mtp: dict, weights: dict, config: dict, sanitize) -> list[dict]:
    """Each MTP layer through the family's own sanitize as if it were layer 0, so that fp8
    dequantization, MLA splits and expert stacking apply to it too."""
    layers = []
    for index in sorted({layer_of(k) for k in mtp}):
        prefix = f"model.layers.{index}."
        layer = {"model.layers.0." + k[len(prefix):]: v for k, v in mtp.items() if k.startswith(prefix)}
        layers.append({k.removeprefix("model.layers.0."): v for k, v in sanitize(layer).items()})
    return layers


def make_cache(config: dict):
    """The layer's cache: DeepSeek-V3.2's keeps its indexer's keys beside the attention's."""
    from mlx_lm.models.cache import CacheList, KVCache

    return CacheList(KVCache(), KVCache()) if config["model_type"] == "deepseek_v32" else KVCache()


def block(config: dict, layer_index: int):
    family = config["model_type"]
    if family == "deepseek_v3":
        from mlx_lm.models import deepseek_v3 as m

        return m.DeepseekV3DecoderLayer(m.ModelArgs.from_dict(config), layer_index)
    if family == "deepseek_v32":
        from mlx_lm.models import deepseek_v32 as m

        return m.DeepseekV32DecoderLayer(m.ModelArgs.from_dict(config), layer_index)
    if family == "glm4_moe":
        from mlx_lm.models import glm4_moe as m

        return m.DecoderLayer(m.ModelArgs.from_dict(config), layer_index)
    from mlx_lm.models import glm4_moe_lite as m

    return m.Glm4MoeLiteDecoderLayer(m.ModelArgs.from_dict(config), layer_index)

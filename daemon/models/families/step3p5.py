"""Step-3.5 (step3p5): three MTP layers after the trunk, each with its own head.

Reference: vLLM `vllm/model_executor/models/step3p5_mtp.py` (Step3p5AMultiTokenPredictorLayer):
    x = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])      # embedding first; h_i after the final norm
    x = a Step-3.5 decoder layer (x)                       # `transformer.*` in the checkpoint
    logits = shared_head.output(shared_head.norm(x))       # each layer's own head
Keys `model.layers.{N+i}.*` (mlx-lm's sanitize drops them). Every norm is Gemma-style (1 + w) and
the checkpoint as released stores w: mlx-lm adds 1 to the trunk's norms when it sees the released
names (`.moe.`), and the MTP layers' norms get the same +1 then, and only then. The layers draft
a round's positions in turn (daemon.drafting.session). An MTP layer that the config makes a
sliding-window one attends over its whole cache here.
"""

from __future__ import annotations

from daemon.models.families.deepseek import LAYER as LAYER  # DeepSeek's layout of the keys
from daemon.models.families.deepseek import is_mtp as is_mtp
from daemon.models.families.deepseek import layer_of

FAMILIES = ("step3p5",)
COMBINE = "embedding_first"
FORWARD = {
    "hidden": "after the final norm",
    "combine": "eh_proj([enorm(e); hnorm(h)])",
    "norms": "RMSNorm, released zero-centred (1 + w)",
    "head": "shared_head.output (each layer's own)",
    "layers": "model.layers.{N+i} (num_nextn_predict_layers)",
}
_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
        "shared_head.norm.weight": "shared_head.norm.weight", "shared_head.output.weight": "shared_head.head.weight"}
_OWN_NORMS = ("enorm.weight", "hnorm.weight", "shared_head.norm.weight")


def zero_centred(weights: dict) -> bool:
    """Whether these tensors carry the release's names (the MoE's `.moe.*`), by which mlx-lm's
    sanitize tells the released layout and adds 1 to the norms."""
    return any(".moe." in k for k in weights)


def convert(mtp: dict, weights: dict, config: dict, sanitize) -> list[dict]:
    """Each MTP layer: its own tensors renamed here, its block (`transformer.*`) through the family's
    sanitize as if it were layer 0; the norms shifted once when the checkpoint is the release."""
    released = zero_centred(weights) or zero_centred(mtp)
    layers = []
    for index in sorted({layer_of(k) for k in mtp}):
        prefix = f"model.layers.{index}."
        own, block = {}, {}
        for key, value in mtp.items():
            if not key.startswith(prefix):
                continue
            rest = key.removeprefix(prefix)
            if rest in _OWN:
                own[_OWN[rest]] = value + 1.0 if released and rest in _OWN_NORMS else value
            elif rest.startswith("transformer."):
                block["model.layers.0." + rest.removeprefix("transformer.")] = value
        shifted_by_sanitize = zero_centred(block)  # a dense block carries no `.moe.`: sanitize cannot tell
        converted = {k.removeprefix("model.layers.0."): v for k, v in sanitize(block).items()}
        if released and not shifted_by_sanitize:
            converted = {k: v + 1.0 if "norm" in k and k.endswith(".weight") else v for k, v in converted.items()}
        layers.append({**own, **converted})
    return layers


def block(config: dict, layer_index: int):
    from mlx_lm.models import step3p5 as m

    return m.Step3p5DecoderLayer(m.ModelArgs.from_dict(config), layer_index)

"""Nemotron-H (nemotron_h): one MTP step made of several blocks, in its own hybrid pattern.

Reference: vLLM `vllm/model_executor/models/nemotron_h_mtp.py` (NemotronHMultiTokenPredictor and its
MTP decoder layers):
    x = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])   # embedding first, on the step's first block;
                                                        # h_i after the trunk's final norm
    x = the family's blocks in `mtp_hybrid_override_pattern` order (x)   # "*" attention, "E" MoE, "-" MLP
    logits = lm_head(final_layernorm(x))                # on the step's last block; the target's head
Keys `mtp.layers.{i}.*` (or `language_model.mtp.layers.{i}.*`; mlx-lm's sanitize drops them), the
blocks' tensors through the family's sanitize (expert stacking); plain RMSNorm weights. As in vLLM
the step holds no Mamba block and there is one step (num_nextn_predict_layers = 1).
"""

from __future__ import annotations

import itertools
import re

import mlx.nn as nn

FAMILIES = ("nemotron_h",)
COMBINE = "embedding_first"
FORWARD = {
    "hidden": "after the final norm",
    "combine": "eh_proj([enorm(e); hnorm(h)]) on the step's first block",
    "norms": "RMSNorm (w)",
    "head": "final_layernorm on the step's last block, then the target's lm_head",
    "layers": "mtp.layers.{i}: the blocks of one step (mtp_hybrid_override_pattern)",
}
LAYER = re.compile(r"^(?:language_model\.)?(mtp)\.layers\.")  # one step, its blocks inside
_KEY = re.compile(r"^(?:language_model\.)?mtp\.layers\.(\d+)\.(.+)$")
_START = ("enorm.weight", "hnorm.weight", "eh_proj.weight")


def is_mtp(key: str, config: dict) -> bool:
    return _KEY.match(key) is not None


def pattern(config: dict) -> str:
    blocks = "".join(config.get("mtp_hybrid_override_pattern") or "*")
    if set(blocks) - set("*E-"):
        raise ValueError(f"the MTP step's pattern {blocks!r} has blocks other than attention (*), MoE (E) and MLP (-)")
    return blocks


def convert(mtp: dict, weights: dict, config: dict, sanitize) -> list[dict]:
    """The step: its first block's projections, its last block's final norm, and every block's
    tensors through the family's sanitize as the trunk's blocks of the same index."""
    last = len(pattern(config)) - 1
    own, blocks = {}, {}
    for key, value in mtp.items():
        index, rest = _KEY.match(key).groups()
        if index == "0" and rest in _START:
            own[rest] = value
        elif int(index) == last and rest == "final_layernorm.weight":
            own["shared_head.norm.weight"] = value
        else:
            blocks[f"backbone.layers.{index}.{rest}"] = value
    own.update({"sublayers." + k.removeprefix("backbone.layers."): v for k, v in sanitize(blocks).items()})
    return [own]


class Step(nn.Module):
    """The MTP step's blocks as one drafter block: mlx-lm's NemotronHBlock per pattern character, the
    attention ones each on its own cache (a CacheList), in order."""

    def __init__(self, config: dict):
        super().__init__()
        from mlx_lm.models.nemotron_h import ModelArgs, NemotronHBlock

        args = ModelArgs.from_dict(config)
        self.sublayers = [NemotronHBlock(args, b) for b in pattern(config)]

    def __call__(self, x, mask, cache=None):
        caches = iter(cache) if cache is not None else itertools.repeat(None)
        for layer in self.sublayers:
            x = layer(x, mask=mask, cache=next(caches) if layer.block_type == "*" else None)
        return x


def make_cache(config: dict):
    from mlx_lm.models.cache import CacheList, KVCache

    return CacheList(*[KVCache() for b in pattern(config) if b == "*"])


def block(config: dict, layer_index: int):
    return Step(config)

"""Drafter files: building an MTP drafter from checkpoint weights, saving, loading and quantizing it."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from daemon.models import block_io, family
from daemon.models.mtp import BLOCK_PARTS, DrafterConfig, MTPDrafter, MTPLayers, mtp_layers

_LAYER_PREFIX = re.compile(r"^model\.layers\.\d+\.")
GROUP_SIZE = 64


def module_keys(weights: dict) -> dict:
    """Checkpoint names (`model.layers.{N}.self_attn...`, or without the prefix) -> module names."""
    renamed = {}
    for key, value in weights.items():
        key = _LAYER_PREFIX.sub("", key)
        if key.startswith("embed_tokens."):  # the target's embedding, shipped again: use the target's
            continue
        if key.split(".")[0] in BLOCK_PARTS:
            key = "block." + key
        renamed[key] = value
    return renamed


def checkpoint_keys(weights: dict) -> dict:
    """Module names -> the community's extracted-MTP layout (no `model.layers.N.` prefix)."""
    return {k.removeprefix("block."): v for k, v in weights.items()}


def build(config: DrafterConfig, weights: dict | None = None, bits: int | None = None) -> MTPDrafter:
    """A drafter from checkpoint weights, or randomly initialised when `weights` is None; `bits`:
    the weights are stored quantized (daemon.models.drafter_io.quantize)."""
    drafter = getattr(family.adapter(config.target["model_type"]), "Drafter", MTPDrafter)(config)
    if bits is not None:
        nn.quantize(drafter, group_size=GROUP_SIZE, bits=bits, class_predicate=_linear)
    if weights is not None:
        drafter.load_weights(list(module_keys(weights).items()), strict=True)
    mx.eval(drafter.parameters())
    drafter.eval()
    return drafter


def stacked(drafters: list):
    """One drafter, or its MTP layers together."""
    return drafters[0] if len(drafters) == 1 else MTPLayers(drafters)


def from_checkpoint(text_config: dict, layers: list[dict]):
    """A family's own MTP layers, their tensors already in the drafter's names (daemon.models.family)."""
    adapter = family.adapter(text_config["model_type"])
    hidden, n = getattr(adapter, "HIDDEN", "post_norm"), text_config["num_hidden_layers"]
    return stacked([build(DrafterConfig(text_config, n + j, hidden, own_head="shared_head.head.weight" in mtp,
                                        combine=adapter.COMBINE), mtp) for j, mtp in enumerate(layers)])


def random_drafter(target_config: dict, seed: int = 0, hidden_source: str = "post_norm") -> MTPDrafter:
    mx.random.seed(seed)
    return build(DrafterConfig(target_config, target_config["num_hidden_layers"], hidden_source))


def save(drafter, folder: str | Path, extra: dict | None = None) -> None:
    """config.json + model.safetensors in the extracted-MTP layout (several layers under
    `layers.{j}.`), written atomically per file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = mtp_layers(drafter)
    config = {"model_type": "mtp_drafter", **asdict(drafter.config), "mtp_layers": len(layers), **(extra or {})}
    weights = {}
    for j, layer in enumerate(layers):
        prefix = f"layers.{j}." if len(layers) > 1 else ""
        weights.update({prefix + k: v for k, v in checkpoint_keys(dict(tree_flatten(layer.parameters()))).items()})
    tmp = folder / "model.tmp.safetensors"
    mx.save_safetensors(str(tmp), weights)
    tmp.replace(folder / "model.safetensors")
    (folder / "config.json.tmp").write_text(json.dumps(config, indent=1))
    (folder / "config.json.tmp").replace(folder / "config.json")


def load_folder(folder: str | Path, target_config: dict):
    """A separate drafter folder: config.json (our fields, or a DeepSeek-style `num_hidden_layers`)
    and one or more safetensors files with the MTP layer's weights (several layers: `mtp_layers`,
    each under `layers.{j}.`), or a block drafter as released (daemon.models.block_io)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no drafter at {folder}: expected config.json and *.safetensors")
    meta = json.loads((folder / "config.json").read_text())
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    if not weights:
        raise FileNotFoundError(f"no *.safetensors in drafter folder {folder}")
    if block_io.kind(meta):
        return block_io.load(folder, meta, weights, target_config)
    count = meta.get("mtp_layers", 1)
    per_layer = [weights] if count == 1 else [
        {k.removeprefix(f"layers.{j}."): v for k, v in weights.items() if k.startswith(f"layers.{j}.")} for j in range(count)]
    drafters = []
    for j, layer in enumerate(per_layer):
        config = DrafterConfig(
            target=meta.get("target", target_config),
            layer_index=meta.get("layer_index", target_config["num_hidden_layers"]) + j,
            hidden_source=meta.get("hidden_source", "post_norm"),
            feature_layers=meta.get("feature_layers", []),
            reads_offers=meta.get("reads_offers", False),
            own_head=any(k.endswith("shared_head.head.weight") for k in layer),
            head_vocab=meta.get("head_vocab"),
            combine=meta.get("combine", "embedding_first"),
        )
        if config.target["hidden_size"] != target_config["hidden_size"]:
            raise ValueError(
                f"drafter hidden size {config.target['hidden_size']} does not match the target's "
                f"{target_config['hidden_size']}"
            )
        try:
            drafters.append(build(config, layer, meta.get("bits")))
        except ValueError as e:  # mlx's strict load lists every name: keep its first words
            summary = str(e).split(":")[0]
            raise ValueError(f"{folder} is not an MTP drafter for this {target_config['model_type']} model ({summary}); "
                             "a checkpoint with its own MTP layers goes through `mtpd drafter extract` first") from None
    return stacked(drafters)


def _linear(_, module) -> bool:
    """The layers quantized: linear ones whose input width divides into groups."""
    return isinstance(module, nn.Linear) and module.weight.shape[-1] % GROUP_SIZE == 0


def quantize(drafter, bits: int, keep_quantized: bool, group_size: int = GROUP_SIZE) -> None:
    """Quantize the drafter on its own. On Metal the weights stay quantized; on a CPU they are
    rounded to `bits` and kept as fp32 (same acceptance, fast fp32 matmuls)."""
    if bits not in (3, 4, 8):
        raise ValueError("drafter bits must be 8, 4 or 3")
    if keep_quantized:
        nn.quantize(drafter, group_size=group_size, bits=bits, class_predicate=_linear)
        return
    rounded = [
        (f"{name}.weight", mx.dequantize(*mx.quantize(m.weight.astype(mx.float32), group_size=group_size, bits=bits),
                                         group_size=group_size, bits=bits))
        for name, m in drafter.named_modules()
        if _linear(name, m)  # what nn.quantize would quantize
    ]
    drafter.load_weights(rounded, strict=False)
    drafter.update(tree_map(lambda p: p.astype(mx.float32), drafter.parameters()))
    mx.eval(drafter.parameters())

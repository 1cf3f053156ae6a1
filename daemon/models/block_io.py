"""Block drafter folders as released: z-lab's DFlash (`DFlashDraftModel`, `dflash_config`) and
DeepSeek's DSpark sidecars (`Qwen3DSparkModel`), their config.json read into a BlockConfig and
their tensors loaded strictly (every one used, none missing) under their own names; and the ones
`mtpd train-drafter --kind block` writes in the same layout (`save`: DSpark's fields, the target's
embedding and a head over `head_vocab`)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from daemon.models.block import BlockConfig, BlockDrafter

_LAYER_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                 "vocab_size", "rms_norm_eps")


def kind(meta: dict) -> str | None:
    """"dflash", "dflash2", "dspark" for a block drafter's config.json, else None."""
    architectures = " ".join(meta.get("architectures") or [])
    if "DFlash2" in architectures:
        return "dflash2"
    if "DFlash" in architectures or "dflash_config" in meta:
        return "dflash"
    if "DSpark" in architectures:
        return "dspark"
    return None


def config(meta: dict, target_config: dict, folder: Path) -> BlockConfig:
    """The BlockConfig of a released config.json; a layout mtpd cannot run is refused in one line."""
    found = kind(meta)
    if found == "dflash2":
        raise ValueError(f"{folder} is a DFlash2 drafter (candidate selector, conv kernels): not supported yet; "
                         "DFlash and DSpark drafters are")
    if "gemma" in str(meta.get("model_type", "")):
        raise ValueError(f"{folder} is a block drafter for a Gemma target: not supported yet (Qwen3-style layers are)")
    if any(t != "full_attention" for t in meta.get("layer_types") or []):
        raise ValueError(f"{folder} has sliding-window drafter layers: not supported yet")
    missing = [f for f in _LAYER_FIELDS if f not in meta]
    if missing:
        raise ValueError(f"{folder}/config.json lacks {', '.join(missing)}")
    dflash = meta.get("dflash_config") or {}
    block = {**meta, **dflash}  # DFlash keeps these under dflash_config (older configs: at the top)
    for name in ("block_size", "mask_token_id", "target_layer_ids"):
        if name not in block:
            raise ValueError(f"{folder}/config.json lacks {name}")
    try:
        return _config(meta, block, found, target_config)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from None


def _config(meta: dict, block: dict, found: str, target_config: dict) -> BlockConfig:
    return BlockConfig(
        target=target_config, kind=found,
        **{f: meta[f] for f in _LAYER_FIELDS},
        head_dim=meta.get("head_dim") or meta["hidden_size"] // meta["num_attention_heads"],
        rope_theta=meta.get("rope_theta", 10000.0), rope_scaling=meta.get("rope_scaling"),
        max_position_embeddings=meta.get("max_position_embeddings", 32768),
        attention_bias=bool(meta.get("attention_bias", False)),
        block_size=int(block["block_size"]), mask_token_id=int(block["mask_token_id"]),
        target_layer_ids=[int(i) for i in block["target_layer_ids"]],
        markov_rank=int(meta.get("markov_rank", 0)), markov_head_type=str(meta.get("markov_head_type", "vanilla")),
        confidence_head=bool(meta.get("enable_confidence_head", False)),
        confidence_with_markov=bool(meta.get("enable_confidence_head", False) and meta.get("confidence_head_with_markov")),
        own_embedding=found == "dspark" and not meta.get("shared_embedding", False),
        reads_last=bool(meta.get("reads_last", False)),
        head_vocab=meta.get("head_vocab"),
    )


def describe(folder: Path, meta: dict) -> dict:
    """What `mtpd inspect` says of a block drafter's folder."""
    found = kind(meta)
    block = {**meta, **(meta.get("dflash_config") or {})}
    report = {"model": str(folder), "drafter_kind": found, "block_size": block.get("block_size"),
              "target_layer_ids": block.get("target_layer_ids"), "mask_token_id": block.get("mask_token_id"),
              "layers": meta.get("num_hidden_layers"), "hidden_size": meta.get("hidden_size")}
    if found == "dspark":
        report.update(markov_head=meta.get("markov_head_type") if meta.get("markov_rank") else None,
                      confidence_head=bool(meta.get("enable_confidence_head")))
    try:
        config(meta, {"num_hidden_layers": 1 + max(block.get("target_layer_ids") or [0]),
                      "hidden_size": meta.get("hidden_size")}, folder)
        report["plan"] = "a block drafter: pass it as --drafter DIR beside its target (a block of drafts per forward)"
    except (ValueError, TypeError) as e:
        report["plan"] = f"not run: {e}"
    return report


def load(folder: Path, meta: dict, weights: dict, target_config: dict) -> BlockDrafter:
    """A block drafter from its folder's config and tensors, strictly."""
    c = config(meta, target_config, folder)
    if c.vocab_size != target_config["vocab_size"]:
        raise ValueError(f"{folder} drafts over {c.vocab_size} tokens; the target has {target_config['vocab_size']}")
    drafter = BlockDrafter(c)
    try:
        drafter.load_weights(list(weights.items()), strict=True)
    except ValueError as e:  # mlx's strict load lists every name: keep its first words
        raise ValueError(f"{folder} is not a {c.kind} drafter of this layout ({str(e).split(':')[0]})") from None
    mx.eval(drafter.parameters())
    drafter.eval()
    return drafter


def save(drafter: BlockDrafter, folder: Path, extra: dict | None = None) -> None:
    """config.json (DSpark's fields, `shared_embedding`, `head_vocab`) and model.safetensors, each
    written atomically."""
    c = drafter.config
    if c.kind != "dspark" or c.own_embedding or c.markov_rank or c.confidence_head:
        raise ValueError("only block drafters of mtpd's own layout are saved (dspark rows, the target's embedding)")
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["DSparkDraftModel"], "model_type": "mtpd_block_drafter", "shared_embedding": True,
        **{f: getattr(c, f) for f in (*_LAYER_FIELDS, "head_dim", "rope_theta", "rope_scaling", "max_position_embeddings",
                                      "attention_bias", "block_size", "mask_token_id", "target_layer_ids", "reads_last",
                                      "head_vocab")},
        "layer_types": ["full_attention"] * c.num_hidden_layers, **(extra or {}),
    }
    mx.save_safetensors(str(folder / "model.tmp.safetensors"), dict(tree_flatten(drafter.parameters())))
    (folder / "model.tmp.safetensors").replace(folder / "model.safetensors")
    (folder / "config.json.tmp").write_text(json.dumps(config, indent=1))
    (folder / "config.json.tmp").replace(folder / "config.json")

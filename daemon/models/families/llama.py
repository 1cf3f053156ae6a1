"""Llama-family targets (SmolLM2, the default model): no MTP layer ships with them; `mtpd
train-drafter` trains one in DeepSeek's shape (daemon.models.mtp) around a llama decoder layer."""

from __future__ import annotations

FAMILIES = ("llama",)
COMBINE = "embedding_first"
FORWARD = {
    "hidden": "after the final norm (a trained drafter's setting)",
    "combine": "eh_proj([enorm(e); hnorm(h); block features...])",
    "norms": "RMSNorm (w)",
    "head": "the target's (or its own over a vocabulary subset)",
    "layers": "none in the checkpoint: a separate drafter folder",
}


def is_mtp(key: str, config: dict) -> bool:
    return False


def convert(mtp: dict, weights: dict, config: dict, sanitize) -> list[dict]:
    return [mtp]


def block(config: dict, layer_index: int):
    from mlx_lm.models import llama

    return llama.TransformerBlock(llama.ModelArgs.from_dict(config))

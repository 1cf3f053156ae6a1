"""Model families: where each keeps its MTP layer in a checkpoint and what that layer's forward is.

One adapter module per family group, in mlx-lm's one-file-per-family shape. Each states:
  FAMILIES     the mlx-lm `model_type`s it covers
  FORWARD      its MTP forward in words (which hidden state, how e and h combine, norms, head)
  COMBINE      "embedding_first" ([enorm(e); hnorm(h)]) or "hidden_first" ([hnorm(h); enorm(e)])
  is_mtp(key)  whether a checkpoint key belongs to the MTP layer(s)
  LAYER        a pattern whose group tells which MTP layer a key of theirs belongs to
  convert(mtp, weights, config, sanitize)
               the MTP tensors (checkpoint names) -> one dict per MTP layer, in order, in the
               drafter's names (DeepSeek's extracted layout: enorm, hnorm, eh_proj, shared_head.*,
               then the block's own names); `weights` is the whole checkpoint (for conventions
               decided by the trunk), `sanitize` the family's own mlx-lm sanitize
  block(config, layer_index)
               one decoder layer of the family, built by mlx-lm's class
  ARRAY_MASK   whether that layer wants an explicit mask array (MLA attention)
  make_cache(config)  (optional) the layer's cache, when it is not one KVCache
  HIDDEN       (optional) the target state it reads, when not the post-norm hidden state
  unsupported(keys)  (optional) why these MTP tensors are not a layer mtpd runs, or None
  Drafter      (optional) its own drafter module, when the forward is not daemon.models.mtp's
"""

from __future__ import annotations

from types import ModuleType

from daemon.models.families import deepseek, deepseek_v4, llama, mimo, nemotron_h, qwen3_next, step3p5

ADAPTERS: dict[str, ModuleType] = {
    name: m for m in (llama, deepseek, deepseek_v4, qwen3_next, mimo, step3p5, nemotron_h) for name in m.FAMILIES}


def adapter(model_type: str) -> ModuleType | None:
    return ADAPTERS.get(model_type)


def text_config(config: dict, num_layers: int | None = None) -> dict:
    """The language model's config, whatever the nesting (Qwen3.5, Gemma 3, Mistral 3 keep it under
    `text_config`), under the checkpoint's own model_type; `num_layers` fills in a count the
    config leaves implicit (Nemotron-H derives it from its block pattern)."""
    text = {k: v for k, v in config.items() if k != "text_config"}
    text.update(config.get("text_config") or {})
    text["model_type"] = config["model_type"]
    if num_layers is not None:
        text["num_hidden_layers"] = num_layers
    return text


def block(config: dict, layer_index: int):
    """One decoder layer of the target's family, as mlx-lm builds it."""
    family = adapter(config["model_type"])
    if family is None:
        raise ValueError(f"no MTP drafter support for the {config['model_type']!r} family ({', '.join(ADAPTERS)})")
    return family.block(config, layer_index)


def make_cache(config: dict):
    """A fresh cache for the family's MTP layer."""
    make = getattr(adapter(config["model_type"]), "make_cache", None)
    if make is not None:
        return make(config)
    from mlx_lm.models.cache import KVCache

    return KVCache()


def unsupported(model_type: str, keys) -> str | None:
    """Why a checkpoint's MTP tensors (their keys) are not a drafter mtpd runs, or None (the
    family's optional `unsupported`: DeepSeek V4's DSpark blocks)."""
    check = getattr(adapter(model_type), "unsupported", None)
    return check(keys) if check is not None else None


def array_mask(model_type: str) -> bool:
    return getattr(adapter(model_type), "ARRAY_MASK", False)

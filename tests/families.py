"""Tiny random checkpoints of mlx-lm's model families, written as mlx-lm folders.

Each config names its fields as the family's released config.json does, scaled down (64 wide, 2-4
layers); the weights are mlx-lm's own model class, randomly initialised and saved as it saves them.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

ATTN = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
            max_position_embeddings=1024, rope_theta=10000.0)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[],
           norm_topk_prob=True)
LINEAR = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
              linear_conv_kernel_dim=4, full_attention_interval=2)


def configs(vocab: int) -> dict[str, dict]:
    """family -> config.json of a tiny checkpoint (vocab: the test tokenizer's size)."""
    base = dict(ATTN, vocab_size=vocab, num_hidden_layers=2)
    qwen35_text = dict(base, model_type="qwen3_5_text", num_hidden_layers=4, head_dim=16, tie_word_embeddings=False,
                       **LINEAR, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.25, "mrope_section": [1, 1, 0]})
    return {
        "llama": dict(base, model_type="llama", tie_word_embeddings=False),
        "qwen2": dict(base, model_type="qwen2", tie_word_embeddings=True),
        "qwen3": dict(base, model_type="qwen3", head_dim=16, tie_word_embeddings=True),
        "qwen3_moe": dict(base, model_type="qwen3_moe", head_dim=16, tie_word_embeddings=False, **MOE),
        "phi3": dict(base, model_type="phi3", num_key_value_heads=4),
        "olmo2": dict(base, model_type="olmo2"),
        "gemma3_text": dict(base, model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                            sliding_window_pattern=2),
        "gemma3": dict(model_type="gemma3", vocab_size=vocab, text_config=dict(
            base, model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
            sliding_window_pattern=2, vocab_size=vocab)),
        "qwen3_5": dict(model_type="qwen3_5", text_config=qwen35_text, tie_word_embeddings=False),
        "qwen3_next": dict(base, model_type="qwen3_next", num_hidden_layers=4, head_dim=16, partial_rotary_factor=0.25,
                           shared_expert_intermediate_size=32, **MOE, **LINEAR),
        "deepseek_v3": dict(base, model_type="deepseek_v3", moe_intermediate_size=16, n_shared_experts=1,
                            n_routed_experts=4, routed_scaling_factor=1.0, kv_lora_rank=16, q_lora_rank=None,
                            qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, topk_method="noaux_tc",
                            scoring_func="sigmoid", norm_topk_prob=True, n_group=1, topk_group=1,
                            num_experts_per_tok=2, moe_layer_freq=1, first_k_dense_replace=1),
        "deepseek_v32": dict(base, model_type="deepseek_v32", moe_intermediate_size=16, n_shared_experts=1,
                             n_routed_experts=4, routed_scaling_factor=1.0, kv_lora_rank=16, q_lora_rank=32,
                             qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, index_head_dim=16,
                             index_n_heads=2, index_topk=4, num_experts_per_tok=2, first_k_dense_replace=1),
        "glm4_moe_lite": dict(base, model_type="glm4_moe_lite", moe_intermediate_size=16, n_shared_experts=1,
                              n_routed_experts=4, routed_scaling_factor=1.0, kv_lora_rank=16, q_lora_rank=32,
                              qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, num_experts_per_tok=2,
                              first_k_dense_replace=1, num_nextn_predict_layers=1),
        "glm4_moe": dict(base, model_type="glm4_moe", head_dim=16, moe_intermediate_size=16, norm_topk_prob=True,
                         n_group=1, topk_group=1, n_shared_experts=1, n_routed_experts=4, routed_scaling_factor=1.0,
                         num_experts_per_tok=2, first_k_dense_replace=1, rope_scaling=None, use_qk_norm=True,
                         tie_word_embeddings=False, attention_bias=True, partial_rotary_factor=0.5,
                         num_nextn_predict_layers=1),
        "mimo": dict(base, model_type="mimo", num_nextn_predict_layers=1),
        "deepseek_v41": dict(model_type="deepseek_v41", architectures=["DeepseekV41ForCausalLM"], text_config=dict(
            vocab_size=vocab, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, head_dim=32, q_lora_rank=32,
            qk_rope_head_dim=8, o_groups=2, o_lora_rank=16, moe_intermediate_size=32, n_routed_experts=4,
            num_experts_per_tok=2, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, swiglu_limit=10.0,
            rms_norm_eps=1e-6, sliding_window=8, compress_ratios=[0, 4, 4, 0], kv_source_layer_ids=[1],
            index_source_layer_ids=[1], index_n_heads=2, index_head_dim=16, index_topk=4, candidate_source_layer_id=-1,
            hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, num_nextn_predict_layers=1, max_position_embeddings=4096,
            rope_theta=10000.0, compress_rope_theta=160000.0)),
        "step3p5": dict(base, model_type="step3p5", num_hidden_layers=3, num_attention_groups=2, head_dim=16,
                        rms_norm_eps=1e-5, sliding_window=8,  # layer_types: the trunk's, then the MTP layer's
                        layer_types=["full_attention", "sliding_attention", "full_attention", "full_attention"],
                        moe_num_experts=4, moe_top_k=2, moe_intermediate_size=32, share_expert_dim=32,
                        moe_layers_enum="1,2,4,5", moe_router_scaling_factor=3.0, num_nextn_predict_layers=1),
        "nemotron_h": dict(model_type="nemotron_h", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                           max_position_embeddings=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           attention_bias=False, mamba_num_heads=4, mamba_head_dim=16, mamba_proj_bias=False,
                           ssm_state_size=16, conv_kernel=4, n_groups=1, mlp_bias=False, layer_norm_epsilon=1e-5,
                           use_bias=False, use_conv_bias=True, hybrid_override_pattern=["M", "*", "M", "-"],
                           num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E", n_routed_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32,
                           n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0),
        "lfm2": dict(model_type="lfm2", vocab_size=vocab, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=1024, norm_eps=1e-5, conv_bias=False,
                     conv_L_cache=3, block_dim=64, block_multiple_of=16, block_ffn_dim_multiplier=1.0,
                     block_auto_adjust_ff_dim=False, full_attn_idxs=[1], block_ff_dim=128),
    }


def random_model(config: dict, seed: int = 0, scale: float = 0.3):
    """mlx-lm's model of `config` with random normal weights (norms near 1)."""
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    mx.random.seed(seed)

    def draw(path, p):
        if not mx.issubdtype(p.dtype, mx.floating):
            return p
        if "norm" in path and p.ndim == 1:
            return 1 + 0.1 * mx.random.normal(p.shape)
        return mx.random.normal(p.shape) * scale

    flat = [(k, draw(k, v)) for k, v in tree_flatten(model.parameters())]
    model.load_weights(flat)
    mx.eval(model.parameters())
    return model


def write_folder(folder: Path, config: dict, weights: dict, tokenizer) -> Path:
    """config.json, model.safetensors and the tokenizer, as an mlx-lm folder holds them."""
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(str(folder))
    return folder


def write_family(folder: Path, family: str, tokenizer, vocab: int, seed: int = 0) -> Path:
    config = configs(vocab)[family]
    model = random_model(config, seed)
    weights = dict(tree_flatten(model.parameters()))
    return write_folder(folder, config, weights, tokenizer)


# The MTP families' checkpoints as released: the trunk and an MTP layer under the family's own names.

ZERO_CENTRED = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight", ".q_norm.weight",
                ".k_norm.weight")


def unstack_experts(params: dict) -> dict:
    """mlx-lm's stacked experts (`switch_mlp.{proj}.weight` [E, ...]) -> one tensor per expert."""
    out = {}
    for name, value in params.items():
        if ".switch_mlp." in name or name.startswith("switch_mlp."):
            head, _, tail = name.partition("switch_mlp.")
            proj = tail.split(".")[0]
            for e in range(value.shape[0]):
                out[f"{head}experts.{e}.{proj}.weight"] = value[e]
        else:
            out[name] = value
    return out


def unstack_nemotron(params: dict) -> dict:
    """mlx-lm's stacked Nemotron-H experts (`switch_mlp.fc1/fc2` [E, ...]) -> the release's
    `experts.{e}.up_proj / down_proj`."""
    out = {}
    for name, value in params.items():
        head, sep, tail = name.partition("switch_mlp.")
        if sep:
            proj = {"fc1": "up_proj", "fc2": "down_proj"}[tail.split(".")[0]]
            out.update({f"{head}experts.{e}.{proj}.weight": value[e] for e in range(value.shape[0])})
        else:
            out[name] = value
    return out


def released_qwen(weights: dict, family: str) -> dict:
    """mlx-lm's Qwen3.5 / Qwen3-Next weights -> the released names, zero-centred norms (w - 1) and
    torch's conv1d layout [C, 1, K]."""
    out = {}
    for name, value in unstack_experts(weights).items():
        if family == "qwen3_5":
            name = name.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head", "lm_head")
        if "conv1d.weight" in name:
            value = value.moveaxis(1, 2)
        if any(name.endswith(s) for s in ZERO_CENTRED) and value.ndim == 1:
            value = value - 1.0
        out[name] = value
    return out


_V41_NAMES = [(".self_attn.", ".attn."), (".mlp.", ".ffn."), (".input_layernorm.", ".attn_norm."),
              (".post_attention_layernorm.", ".ffn_norm."), (".attn_hc.", ".hc_attn_"), (".ffn_hc.", ".hc_ffn_"),
              (".sinks", ".attn_sink"), (".q_a_proj.", ".wq_a."), (".q_b_proj.", ".wq_b."), (".kv_proj.", ".wkv."),
              (".compressor.gate_proj.", ".compressor.wgate."), (".o_a_proj.", ".wo_a."), (".o_b_proj.", ".wo_b."),
              (".q_a_norm.", ".q_norm."), (".compressor.kv_norm.", ".compressor.norm."), (".indexer.k_proj.", ".indexer.wk."),
              (".gate.e_score_correction_bias", ".gate.bias"), (".shared_experts.gate_proj.", ".shared_experts.w1."),
              (".shared_experts.down_proj.", ".shared_experts.w2."), (".shared_experts.up_proj.", ".shared_experts.w3.")]
_V41_EXPERTS = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


_STEP_NAMES = [(".mlp.switch_mlp.", ".moe."), (".mlp.gate.gate.", ".moe.gate."), (".mlp.gate.router_bias", ".moe.router_bias"),
               (".mlp.share_expert.", ".share_expert.")]


def released_step(weights: dict) -> dict:
    """mlx-lm's Step-3.5 weights -> the release's names (`.moe.*`, `.share_expert.*`) and its
    zero-centred norms (w - 1)."""
    out = {}
    for name, value in weights.items():
        for ours, theirs in _STEP_NAMES:
            name = name.replace(ours, theirs)
        out[name] = value - 1.0 if "norm" in name and name.endswith(".weight") else value
    return out


def released_deepseek_v41(weights: dict) -> dict:
    """mlx-lm's DeepSeek V4.1 weights -> DeepSeek's names as released (`layers.{i}.attn.wq_a`,
    `hc_attn_fn`, one tensor per expert, `wo_a` as one matrix); checked against mlx-lm's own rename."""
    from mlx_lm.models.deepseek_v41 import _rename

    out = {}
    for name, value in weights.items():
        if name in ("lm_head.weight", "model.embed_tokens.weight"):
            released = {"lm_head.weight": "head.weight", "model.embed_tokens.weight": "embed.weight"}[name]
        else:
            released = name.removeprefix("model.")
            for ours, theirs in _V41_NAMES:
                released = released.replace(ours, theirs)
        if ".experts.switch_mlp." in released:
            head, _, proj = released.removesuffix(".weight").partition(".experts.switch_mlp.")
            out.update({f"{head}.experts.{e}.{_V41_EXPERTS[proj]}.weight": value[e] for e in range(value.shape[0])})
            continue
        assert _rename(released) == name, (name, released)
        out[released] = value.reshape(-1, value.shape[-1]) if released.endswith(".wo_a.weight") else value
    return out


def _draw(module, seed: int):
    mx.random.seed(seed)
    flat = [(k, 1 + 0.1 * mx.random.normal(v.shape) if ("norm" in k and v.ndim == 1) else mx.random.normal(v.shape) * 0.3)
            for k, v in tree_flatten(module.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    module.load_weights(flat, strict=False)
    mx.eval(module.parameters())
    return module


def write_with_mtp(folder: Path, family: str, tokenizer, vocab: int, seed: int = 0, layers: int = 1,
                   converted: bool = False) -> dict:
    """A tiny `family` checkpoint in its released layout with `layers` MTP layers (one for the
    Qwen families, whose MTP module stacks its layers); `converted`: as an mlx-lm conversion that
    kept the MTP layers would hold it instead (mlx-lm's names and norms as they multiply, the MTP
    layers' own tensors under the release's names). Returns what an independent reference of the
    MTP forward needs, for the first layer (the later ones under "later"): effective norm weights
    (as they multiply), the projection(s), the head (None: the target's), the block as an mlx-lm
    layer, the order."""
    from daemon.models import family as families

    config = configs(vocab)[family]
    if layers > 1:
        fields = config["text_config"] if "text_config" in config else config
        fields["num_nextn_predict_layers"] = layers
        if "layer_types" in fields:  # padded with the MTP layers', as the releases do
            fields["layer_types"] = fields["layer_types"] + ["full_attention"] * (layers - 1)
    model = random_model(config, seed)
    text = families.text_config(config, len(model.layers))  # Nemotron-H's count is its pattern's length
    weights = dict(tree_flatten(model.parameters()))
    released = {"qwen3_5": lambda w: released_qwen(w, "qwen3_5"), "qwen3_next": lambda w: released_qwen(w, "qwen3_next"),
                "deepseek_v41": released_deepseek_v41, "step3p5": released_step}
    raw = dict(weights) if converted else released.get(family, dict)(weights)
    refs = []
    for j in range(layers):
        tensors, ref = _mtp_layer(family, text, weights, vocab, seed + 10 * j, j, converted)
        raw.update(tensors)
        refs.append(ref)
    write_folder(folder, config, raw, tokenizer)
    return {**refs[0], "later": refs[1:]}


def _mtp_layer(family: str, text: dict, weights: dict, vocab: int, seed: int, j: int,
               converted: bool = False) -> tuple[dict, dict]:
    """MTP layer j's tensors under the family's released names (or a conversion's), and its reference."""
    from daemon.models import family as families

    n, hidden = text["num_hidden_layers"], text["hidden_size"]
    block = _draw(families.block(text, n + j), seed + 1)
    block_params = dict(tree_flatten(block.parameters()))
    mx.random.seed(seed + 2)
    ref = {"enorm": 1 + 0.1 * mx.random.normal((hidden,)), "hnorm": 1 + 0.1 * mx.random.normal((hidden,)),
           "norm": 1 + 0.1 * mx.random.normal((hidden,)), "proj": mx.random.normal((hidden, 2 * hidden)) * 0.2,
           "head": None, "block": block, "order": "embedding_first"}
    shift = 0.0 if converted else 1.0  # the release stores zero-centred norms (Qwen, Step-3.5)
    if family in ("qwen3_5", "qwen3_next"):
        layer = {f"mtp.layers.0.{k}": v for k, v in block_params.items()}
        raw = layer if converted else released_qwen(layer, family)
        raw.update({"mtp.fc.weight": ref["proj"], "mtp.pre_fc_norm_embedding.weight": ref["enorm"] - shift,
                    "mtp.pre_fc_norm_hidden.weight": ref["hnorm"] - shift, "mtp.norm.weight": ref["norm"] - shift})
    elif family == "mimo":
        ref["order"] = "hidden_first"
        raw = {f"model.mtp_layers.{j}.{k}": v for k, v in block_params.items()}
        raw.update({f"model.mtp_layers.{j}.input_proj.weight": ref["proj"],
                    f"model.mtp_layers.{j}.token_layernorm.weight": ref["enorm"],
                    f"model.mtp_layers.{j}.hidden_layernorm.weight": ref["hnorm"],
                    f"model.mtp_layers.{j}.final_layernorm.weight": ref["norm"]})
    elif family == "deepseek_v41":
        ref.update(proj=mx.random.normal((hidden, hidden)) * 0.2, e_proj=mx.random.normal((hidden, hidden)) * 0.2,
                   hc_head=(mx.random.normal((text["hc_mult"], text["hc_mult"] * hidden)) * 0.3,
                            mx.random.normal((text["hc_mult"],)) * 0.3, mx.array([1.2])))
        layer = released_deepseek_v41({f"model.layers.0.{k}": v for k, v in block_params.items()})
        raw = {f"mtp.{j}.{k.removeprefix('layers.0.')}": v for k, v in layer.items()}
        fn, base, scale = ref["hc_head"]
        raw.update({f"mtp.{j}.{k}": v for k, v in {
            "h_proj.weight": ref["proj"], "e_proj.weight": ref["e_proj"], "enorm.weight": ref["enorm"],
            "hnorm.weight": ref["hnorm"], "norm.weight": ref["norm"], "hc_head_fn": fn, "hc_head_base": base,
            "hc_head_scale": scale, "emb.tok_emb.weight": weights["model.embed_tokens.weight"]}.items()})
    elif family == "nemotron_h":
        raw = {}
        for name, value in unstack_nemotron(block_params).items():
            index, _, rest = name.removeprefix("sublayers.").partition(".")
            raw[f"mtp.layers.{index}.{rest}"] = value
        last = len(text["mtp_hybrid_override_pattern"]) - 1
        raw.update({"mtp.layers.0.enorm.weight": ref["enorm"], "mtp.layers.0.hnorm.weight": ref["hnorm"],
                    "mtp.layers.0.eh_proj.weight": ref["proj"], f"mtp.layers.{last}.final_layernorm.weight": ref["norm"]})
    elif family == "step3p5":
        ref["head"] = mx.random.normal((vocab, hidden)) * 0.3
        layer = {f"model.layers.0.{k}": v for k, v in block_params.items()}
        raw = {f"model.layers.{n + j}.transformer.{k.removeprefix('model.layers.0.')}": v
               for k, v in (layer if converted else released_step(layer)).items()}
        raw.update({f"model.layers.{n + j}.{k}": v for k, v in {
            "enorm.weight": ref["enorm"] - shift, "hnorm.weight": ref["hnorm"] - shift, "eh_proj.weight": ref["proj"],
            "shared_head.norm.weight": ref["norm"] - shift, "shared_head.output.weight": ref["head"]}.items()})
    else:  # DeepSeek-style: model.layers.{N + j}
        ref["head"] = mx.random.normal((vocab, hidden)) * 0.3
        layer = {"enorm.weight": ref["enorm"], "hnorm.weight": ref["hnorm"], "eh_proj.weight": ref["proj"],
                 "shared_head.norm.weight": ref["norm"], "shared_head.head.weight": ref["head"],
                 "embed_tokens.weight": weights["model.embed_tokens.weight"], **unstack_experts(block_params)}
        raw = {f"model.layers.{n + j}.{k}": v for k, v in layer.items()}
    return raw, ref

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
        "glm4_moe": dict(base, model_type="glm4_moe", head_dim=16, moe_intermediate_size=16, norm_topk_prob=True,
                         n_group=1, topk_group=1, n_shared_experts=1, n_routed_experts=4, routed_scaling_factor=1.0,
                         num_experts_per_tok=2, first_k_dense_replace=1, rope_scaling=None, use_qk_norm=True,
                         tie_word_embeddings=False, attention_bias=True, partial_rotary_factor=0.5,
                         num_nextn_predict_layers=1),
        "mimo": dict(base, model_type="mimo", num_nextn_predict_layers=1),
        "nemotron_h": dict(model_type="nemotron_h", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                           max_position_embeddings=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           attention_bias=False, mamba_num_heads=4, mamba_head_dim=16, mamba_proj_bias=False,
                           ssm_state_size=16, conv_kernel=4, n_groups=1, mlp_bias=False, layer_norm_epsilon=1e-5,
                           use_bias=False, use_conv_bias=True, hybrid_override_pattern=["M", "*", "M", "-"]),
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

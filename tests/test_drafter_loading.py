"""The two routes to a drafter: the MTP layer inside a DeepSeek-V3-family checkpoint, and a
separate drafter folder."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import deepseek_v3 as ds

from daemon.engine.generate import generate
from daemon.engine.records import Request
from daemon.models import drafter_io, family, mtp
from daemon.models.loading import load
from policies.fixed import Fixed

PROMPT = (1, 80, 120, 7, 200, 33, 150)


def ds_config(vocab: int) -> dict:
    return dict(
        model_type="deepseek_v3", vocab_size=vocab, hidden_size=32, intermediate_size=64,
        moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        n_shared_experts=1, n_routed_experts=4, routed_scaling_factor=1.0, kv_lora_rank=16,
        q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, topk_method="noaux_tc",
        scoring_func="sigmoid", norm_topk_prob=True, n_group=1, topk_group=1, num_experts_per_tok=2,
        moe_layer_freq=1, first_k_dense_replace=1, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_theta=10000.0,
    )


def randomize(module, scale=0.5):
    module.update(tree_map(lambda p: mx.random.normal(p.shape) * scale, module.parameters()))


def to_checkpoint_names(block_params: dict, config: dict) -> dict:
    """mlx-lm's sanitized layer -> the names and shapes of the released checkpoints
    (kv_b_proj in one piece, experts one by one)."""
    raw = {}
    for name, value in block_params.items():
        if name.startswith("mlp.switch_mlp."):
            proj = name.split(".")[2]
            for e in range(value.shape[0]):
                raw[f"mlp.experts.{e}.{proj}.weight"] = value[e]
        elif name in ("self_attn.embed_q.weight", "self_attn.unembed_out.weight"):
            continue
        else:
            raw[name] = value
    wk, wv = block_params["self_attn.embed_q.weight"], block_params["self_attn.unembed_out.weight"]
    v = mx.concatenate([wk.swapaxes(-1, -2), wv], axis=1)
    raw["self_attn.kv_b_proj.weight"] = v.reshape(-1, config["kv_lora_rank"])
    return raw


@pytest.fixture(scope="module")
def deepseek_folder(tmp_path_factory, tiny_lm):
    folder = tmp_path_factory.mktemp("dsv3")
    vocab = tiny_lm.config["vocab_size"]
    config = ds_config(vocab)
    mx.random.seed(11)
    model = ds.Model(ds.ModelArgs.from_dict(config))
    randomize(model)
    weights = dict(tree_flatten(model.parameters()))
    block = ds.DeepseekV3DecoderLayer(ds.ModelArgs.from_dict(config), 2)
    randomize(block)
    block_params = dict(tree_flatten(block.parameters()))
    n = config["num_hidden_layers"]
    mtp_layer = {
        "enorm.weight": mx.ones(32), "hnorm.weight": mx.ones(32), "shared_head.norm.weight": mx.ones(32),
        "eh_proj.weight": mx.random.normal((32, 64)) * 0.2,
        "shared_head.head.weight": weights["lm_head.weight"],
        "embed_tokens.weight": weights["model.embed_tokens.weight"],
        **to_checkpoint_names(block_params, config),
    }
    weights.update({f"model.layers.{n}.{k}": v for k, v in mtp_layer.items()})
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    tiny_lm.tokenizer.save_pretrained(str(folder))
    return folder, block_params


def test_deepseek_checkpoint_keeps_its_mtp_layer(deepseek_folder):
    folder, block_params = deepseek_folder
    lm = load(str(folder))
    assert lm.drafter is not None and "built-in MTP" in lm.drafter_name
    assert "head" in lm.drafter.shared_head  # the checkpoint ships shared_head.head
    ours = dict(tree_flatten(lm.drafter.block.parameters()))
    assert set(ours) == set(block_params)  # experts stacked, kv_b_proj split as mlx-lm does
    for name, value in block_params.items():
        np.testing.assert_allclose(np.array(ours[name]), np.array(value), atol=1e-6, err_msg=name)
    plain = list(generate(lm, Request(PROMPT, max_tokens=24), Fixed(0)))[-1]
    spec = list(generate(lm, Request(PROMPT, max_tokens=24), Fixed(2)))[-1]
    assert spec.stats.drafted > 0 and spec.token_ids == plain.token_ids


def test_drafter_folder_round_trip(tmp_path, tiny_gguf):
    lm = load(str(tiny_gguf), drafter="random")
    drafter_io.save(lm.drafter, tmp_path / "d", extra={"note": "test"})
    saved = mx.load(str(tmp_path / "d" / "model.safetensors"))
    assert "eh_proj.weight" in saved and "self_attn.q_proj.weight" in saved  # extracted-MTP names
    again = load(str(tiny_gguf), drafter=str(tmp_path / "d"))
    for (name, a), (_, b) in zip(tree_flatten(lm.drafter.parameters()), tree_flatten(again.drafter.parameters())):
        assert mx.array_equal(a, b), name
    first = list(generate(lm, Request(PROMPT, max_tokens=16), Fixed(3)))[-1]
    second = list(generate(again, Request(PROMPT, max_tokens=16), Fixed(3)))[-1]
    assert first.token_ids == second.token_ids and first.stats.accepted == second.stats.accepted


def test_drafter_folder_with_checkpoint_prefix(tmp_path, tiny_gguf):
    lm = load(str(tiny_gguf), drafter="random")
    extracted = drafter_io.checkpoint_keys(dict(tree_flatten(lm.drafter.parameters())))
    weights = {f"model.layers.2.{k}": v for k, v in extracted.items()}
    (tmp_path / "d").mkdir()
    mx.save_safetensors(str(tmp_path / "d" / "mtp.safetensors"), weights)
    (tmp_path / "d" / "config.json").write_text(json.dumps({"hidden_source": "post_norm"}))
    again = load(str(tiny_gguf), drafter=str(tmp_path / "d"))
    assert mx.array_equal(again.drafter.eh_proj.weight, lm.drafter.eh_proj.weight)


def test_pre_norm_hidden_source(tiny_gguf):
    lm = load(str(tiny_gguf), drafter="none")
    lm.drafter = drafter_io.random_drafter(lm.config, hidden_source="pre_norm")
    plain = list(generate(lm, Request(PROMPT, max_tokens=16), Fixed(0)))[-1]
    spec = list(generate(lm, Request(PROMPT, max_tokens=16), Fixed(3)))[-1]
    assert spec.token_ids == plain.token_ids and spec.stats.drafted > 0


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_drafter_quantization_rounds_weights(tiny_gguf, bits):
    lm = load(str(tiny_gguf), drafter="random", drafter_bits=bits)
    w = lm.drafter.eh_proj.weight
    assert w.dtype == mx.float32
    levels = np.unique(np.array(w[0, :64]))  # one group of 64
    assert len(levels) <= 2**bits


def test_bad_drafter_inputs_are_clear(tmp_path, tiny_gguf):
    with pytest.raises(FileNotFoundError, match="no drafter"):
        load(str(tiny_gguf), drafter=str(tmp_path))
    with pytest.raises(ValueError, match="hidden_source"):
        mtp.DrafterConfig({"model_type": "llama"}, 2, hidden_source="middle")
    with pytest.raises(ValueError, match="no MTP drafter support"):
        family.block({"model_type": "mamba"}, 0)

import mlx.core as mx
import numpy as np
import pytest
import tiny
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from daemon.models.gguf import load_gguf, quantized_bits, rename


def test_rename_maps_every_block_tensor():
    assert rename("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert rename("blk.0.ffn_down.scales") == "model.layers.0.mlp.down_proj.scales"
    assert rename("token_embd.weight") == "model.embed_tokens.weight"
    assert rename("output_norm.weight") == "model.norm.weight"
    with pytest.raises(ValueError, match="unexpected GGUF tensor"):
        rename("blk.0.attn_qkv.weight")


def test_bits_derive_from_shapes():
    w4, s4, _ = mx.quantize(mx.zeros((8, 64)), group_size=32, bits=4)
    w8, s8, _ = mx.quantize(mx.zeros((8, 64)), group_size=32, bits=8)
    assert quantized_bits(w4, s4) == 4
    assert quantized_bits(w8, s8) == 8


def test_weights_match_an_independent_dequantization(tmp_path):
    stored = tiny.write_gguf(tmp_path / "m.gguf", seed=1)
    model, _, config = load_gguf(tmp_path / "m.gguf", quantized=False)
    assert config["rope_traditional"] and not config["tie_word_embeddings"]
    assert config["num_key_value_heads"] == 2 and config["head_dim"] == 16
    params = dict(tree_flatten(model.parameters()))
    for name, value in stored.items():
        ours = np.array(params[rename(name)])
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, value, atol=2e-3, err_msg=name)


def test_logits_match_reference_llama(tmp_path):
    stored = tiny.write_gguf(tmp_path / "m.gguf", seed=2)
    model, _, config = load_gguf(tmp_path / "m.gguf", quantized=False)
    reference = llama.Model(llama.ModelArgs.from_dict(config))
    reference.load_weights([(rename(k), mx.array(v)) for k, v in stored.items()])
    tokens = mx.array([[5, 80, 120, 7, 200, 33]])
    ours, theirs = model(tokens), reference(tokens)
    ours_np, theirs_np = np.array(ours), np.array(theirs)
    assert np.abs(ours_np - theirs_np).max() < 0.02 * np.abs(theirs_np).max()
    assert (mx.argmax(ours, -1) == mx.argmax(theirs, -1)).all().item()


def test_quantized_path_keeps_mixed_bits(tiny_gguf):
    model, _, _ = load_gguf(tiny_gguf, quantized=True)
    assert model.model.embed_tokens.bits == 8
    assert model.model.layers[0].self_attn.q_proj.bits == 4
    fp32, _, _ = load_gguf(tiny_gguf, quantized=False)
    tokens = mx.array([[5, 80, 120, 7]])
    np.testing.assert_allclose(np.array(model(tokens)), np.array(fp32(tokens)), atol=0.1)


def test_tokenizer_from_metadata(tiny_lm):
    tok = tiny_lm.tokenizer
    ids = tok.encode("<|im_start|>the 42")
    assert ids[0] == 1  # the control token stays whole
    assert tok.decode(ids) == "<|im_start|>the 42"
    digits = tok.encode("42")
    assert len(digits) == 2  # digits split one by one
    assert tok.eos_token_ids == {2}


def test_chat_template_from_metadata(tiny_lm):
    from daemon.models.prompts import encode_chat

    ids = encode_chat(tiny_lm.tokenizer, [{"role": "user", "content": "hi"}])
    assert tiny_lm.tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="only the llama family"):
        load_gguf(tmp_path / "x.gguf", quantized=False)

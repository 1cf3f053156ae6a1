"""Tiny llama models written as real GGUF files, for tests that need no downloaded weights."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "r e"]
CONFIG = dict(hidden=64, layers=2, ffn=128, heads=4, kv_heads=2, rope_base=10000.0, eps=1e-5)


def byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def vocabulary() -> tuple[list[str], list[int]]:
    tokens = SPECIALS + byte_chars() + ["".join(m.split(" ")) for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types


def random_weights(seed: int = 0, vocab: int | None = None) -> dict[str, np.ndarray]:
    """GGUF-named fp32 weights of a tiny llama."""
    c = CONFIG
    vocab = vocab or len(vocabulary()[0])
    rng = np.random.default_rng(seed)
    head_dim = c["hidden"] // c["heads"]

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    # An untied head that can only choose printable ASCII (and EOS), so the text is readable.
    output = mat(vocab, c["hidden"]) * 8
    printable = [len(SPECIALS) + b for b in range(32, 127)] + [2]
    output[np.setdiff1d(np.arange(vocab), printable)] = 0
    w = {
        "token_embd.weight": mat(vocab, c["hidden"]),
        "output.weight": output,
        "output_norm.weight": np.ones(c["hidden"], np.float32),
    }
    for i in range(c["layers"]):
        w[f"blk.{i}.attn_q.weight"] = mat(c["hidden"], c["hidden"])
        w[f"blk.{i}.attn_k.weight"] = mat(c["kv_heads"] * head_dim, c["hidden"])
        w[f"blk.{i}.attn_v.weight"] = mat(c["kv_heads"] * head_dim, c["hidden"])
        w[f"blk.{i}.attn_output.weight"] = mat(c["hidden"], c["hidden"])
        w[f"blk.{i}.ffn_gate.weight"] = mat(c["ffn"], c["hidden"])
        w[f"blk.{i}.ffn_up.weight"] = mat(c["ffn"], c["hidden"])
        w[f"blk.{i}.ffn_down.weight"] = mat(c["hidden"], c["ffn"])
        w[f"blk.{i}.attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(c["hidden"])).astype(np.float32)
        w[f"blk.{i}.ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(c["hidden"])).astype(np.float32)
    return w


def quant_type(name: str):
    """Mixed bits as in real files: 8-bit embedding, 4-bit blocks, fp32 norms."""
    if name.startswith(("token_embd", "output.")):
        return gguf.GGMLQuantizationType.Q8_0
    if "norm" in name:
        return gguf.GGMLQuantizationType.F32
    return gguf.GGMLQuantizationType.Q4_1


def write_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Writes the tiny model to `path`; returns the weights as the file stores them, dequantized."""
    c = CONFIG
    tokens, types = vocabulary()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c["layers"])
    writer.add_context_length(2048)
    writer.add_embedding_length(c["hidden"])
    writer.add_feed_forward_length(c["ffn"])
    writer.add_head_count(c["heads"])
    writer.add_head_count_kv(c["kv_heads"])
    writer.add_layer_norm_rms_eps(c["eps"])
    writer.add_rope_freq_base(c["rope_base"])
    writer.add_rope_dimension_count(c["hidden"] // c["heads"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(MERGES)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHATML)
    stored = {}
    for name, value in random_weights(seed, len(tokens)).items():
        qtype = quant_type(name)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, value)
            stored[name] = value
        else:
            data = gguf.quants.quantize(value, qtype)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
            stored[name] = gguf.quants.dequantize(data, qtype).reshape(value.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored

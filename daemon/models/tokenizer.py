"""Build a Hugging Face tokenizer from GGUF metadata (byte-level BPE, the llama.cpp `gpt2` model)."""

from __future__ import annotations

from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

_CONTROL = 3  # llama.cpp token_type for control tokens such as <|im_start|>


def _int(meta: dict, key: str) -> int | None:
    value = meta.get(key)
    return None if value is None else int(value.item() if hasattr(value, "item") else value)


def tokenizer_from_gguf(meta: dict) -> TokenizerWrapper:
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r}: only byte-level BPE ('gpt2')")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    types = meta.get("tokenizer.ggml.token_type")
    types = [] if types is None else [int(t) for t in types.tolist()]

    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    core.decoder = decoders.ByteLevel()
    # Control tokens must be special, or "<|im_start|>" is split into bytes.
    core.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    )

    def token(key: str) -> str | None:
        index = _int(meta, key)
        return None if index is None or index >= len(tokens) else tokens[index]

    hf = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
    )
    hf.chat_template = meta.get("tokenizer.chat_template")
    return TokenizerWrapper(hf, detokenizer_class=BPEStreamingDetokenizer)

"""Prompts to token ids: chat messages through the model's chat template, raw text as is."""

from __future__ import annotations


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    if tokenizer.has_chat_template:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return encode_text(tokenizer, "\n\n".join(str(m.get("content", "")) for m in messages))


def encode_text(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer.encode(prompt))


def system_prefix_length(tokenizer, messages: list[dict], ids: list[int]) -> int:
    """How many leading tokens of `ids` (the encoded `messages`) are the leading system messages
    alone: the part shared by every conversation with the same system prompt. 0 if none."""
    lead = []
    for m in messages:
        if m["role"] != "system":
            break
        lead.append(m)
    if not lead or not tokenizer.has_chat_template:
        return 0
    prefix = list(tokenizer.apply_chat_template(lead, add_generation_prompt=False))
    return len(prefix) if ids[: len(prefix)] == prefix else 0

"""Prompts to token ids: chat messages through the model's chat template, raw text as is."""

from __future__ import annotations


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    if tokenizer.has_chat_template:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return encode_text(tokenizer, "\n\n".join(str(m.get("content", "")) for m in messages))


def encode_text(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer.encode(prompt))

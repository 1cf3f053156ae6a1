"""Prompts to token ids: chat messages through the model's chat template, raw text as is.

Tools reach the model through its own chat template when the template takes them (mlx-lm found a
tool-call format for it); otherwise through a generic format described in a system message: the
tools as JSON inside <tools></tools>, each call as {"name": ..., "arguments": {...}} inside
<tool_call></tool_call>, results inside <tool_response></tool_response> (the Hermes / Qwen2.5
convention, which mlx-lm's `json_tools` parser reads back).
"""

from __future__ import annotations

import json

GENERIC_START, GENERIC_END = "<tool_call>", "</tool_call>"
GENERIC_TOOLS = """# Tools

You may call one or more functions to assist with the user query. The functions are described in \
JSON inside <tools></tools>:
<tools>
{tools}
</tools>

To call a function, reply with its name and arguments as JSON inside <tool_call></tool_call> tags:
<tool_call>
{{"name": "<function-name>", "arguments": {{<arguments as JSON>}}}}
</tool_call>"""


def native_tools(tokenizer) -> bool:
    """Whether the model's chat template takes `tools` itself, with a format mlx-lm can parse."""
    template = getattr(tokenizer, "chat_template", None)
    return bool(tokenizer.has_chat_template and tokenizer.has_tool_calling and isinstance(template, str)
                and "tools" in template)


def _generic(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Messages with the tools described in the system message, calls and results as text."""
    out = []
    for m in messages:
        content = m.get("content") or ""
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
                     for c in m["tool_calls"]]
            content = "\n".join([content] * bool(content) + [f"{GENERIC_START}\n{c}\n{GENERIC_END}" for c in calls])
            out.append({"role": "assistant", "content": content})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": content})
    if tools:
        described = GENERIC_TOOLS.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + described}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def render_messages(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[list[dict], dict]:
    """The messages and keyword arguments the chat template is called with."""
    if tools is not None and native_tools(tokenizer):
        return messages, {"tools": tools}
    if tools is not None or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return _generic(messages, tools or []), {}
    return messages, {}


def encode_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """messages: OpenAI-style dicts (`tool_calls` with their arguments as JSON objects)."""
    messages, extra = render_messages(tokenizer, messages, tools)
    if tokenizer.has_chat_template:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra))
    return encode_text(tokenizer, "\n\n".join(str(m.get("content", "")) for m in messages))


def encode_text(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer.encode(prompt))


def system_prefix_length(tokenizer, messages: list[dict], ids: list[int], tools: list[dict] | None = None) -> int:
    """How many leading tokens of `ids` (the encoded `messages`) are the leading system messages
    alone: the part shared by every conversation with the same system prompt. 0 if none."""
    messages, extra = render_messages(tokenizer, messages, tools)
    lead = []
    for m in messages:
        if m["role"] != "system":
            break
        lead.append(m)
    if not lead or not tokenizer.has_chat_template or extra:
        return 0
    prefix = list(tokenizer.apply_chat_template(lead, add_generation_prompt=False))
    return len(prefix) if ids[: len(prefix)] == prefix else 0

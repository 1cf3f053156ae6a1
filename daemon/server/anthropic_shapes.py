"""Anthropic's Messages API shapes: the request (validated with pydantic, every unknown field
refused, hints accepted and reported: daemon.server.hints), its translation into the chat request
the engine path already serves, the message body, the streaming events and the error body. Pure
data, no HTTP and no MLX."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Literal

from partial_json_parser import loads as partial_loads
from pydantic import Field, model_validator

from daemon.engine.records import Finished
from daemon.server.context_edits import ContextManagement
from daemon.server.hints import hint
from daemon.server.openai_shapes import (
    ApiError,
    ChatRequest,
    FunctionCall,
    FunctionDef,
    JsonSchemaFormat,
    Message,
    NamedFunction,
    NamedToolChoice,
    PromptTooLong,
    ResponseFormat,
    Strict,
    Tool,
    ToolCall,
)


class CacheControl(Strict):
    """A hint: mtpd's prompt cache matches prefixes by itself, for as long as memory allows."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(Strict):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = hint()
    citations: list | None = None


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict
    cache_control: CacheControl | None = hint()


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: Annotated[str, Field(min_length=1)]  # it becomes a tool turn's tool_call_id, which must be set
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None
    cache_control: CacheControl | None = hint()

    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content or [])
        return f"Error: {text}" if self.is_error else text


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class AnthropicMessage(Strict):
    role: Literal["user", "assistant", "system"]  # a system message's text joins the system prompt
    content: str | list[Block]

    @model_validator(mode="after")
    def _blocks_fit_role(self):
        kinds = {b.type for b in self.content} if isinstance(self.content, list) else set()
        if self.role == "system" and kinds - {"text"}:
            raise ValueError("system messages hold text blocks only")
        if self.role == "user" and "tool_use" in kinds:
            raise ValueError("tool_use blocks belong in assistant messages")
        if self.role == "assistant" and "tool_result" in kinds:
            raise ValueError("tool_result blocks belong in user messages")
        return self

    def as_chat(self) -> list[Message]:
        """OpenAI's messages for this turn: tool results first (role tool), then the text and calls."""
        if isinstance(self.content, str):
            return [Message(role=self.role, content=self.content)]
        results = [Message(role="tool", content=b.text(), tool_call_id=b.tool_use_id)
                   for b in self.content if b.type == "tool_result"]
        text = "".join(b.text for b in self.content if b.type == "text")
        calls = [ToolCall(id=b.id, function=FunctionCall(name=b.name, arguments=json.dumps(b.input)))
                 for b in self.content if b.type == "tool_use"]
        if calls:
            return results + [Message(role="assistant", content=text or None, tool_calls=calls)]
        return results + ([Message(role=self.role, content=text)] if text or not results else [])


class AnthropicTool(Strict):
    type: Literal["custom"] | None = None  # server tools (web search, code execution) are not served
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    input_schema: dict
    strict: bool | None = None  # forced calls follow the schema whatever it says
    cache_control: CacheControl | None = hint()

    def as_chat(self) -> Tool:
        return Tool(type="function", function=FunctionDef(name=self.name, description=self.description,
                                                          parameters=self.input_schema))


class AnthropicToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _named(self):
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("a name goes with type 'tool', and only with it")
        return self

    def as_chat(self):
        if self.type == "tool":
            return NamedToolChoice(type="function", function=NamedFunction(name=self.name))
        return {"auto": "auto", "any": "required", "none": "none"}[self.type]


class Thinking(Strict):
    """A hint: the served models have no reasoning, so they answer without a thinking block
    whatever the type; a budget is checked as Anthropic documents it."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Annotated[int, Field(ge=1024)] | None = None
    display: Literal["summarized", "omitted"] | None = None

    @model_validator(mode="after")
    def _budget(self):
        if (self.type == "enabled") != (self.budget_tokens is not None):
            raise ValueError("budget_tokens goes with type 'enabled', and only with it")
        return self


class JsonOutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: dict = Field(alias="schema")


class OutputConfig(Strict):
    format: JsonOutputFormat | None = None
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = hint()  # no reasoning to spend it on


class Metadata(Strict):
    user_id: str | None = None


class CountTokensRequest(Strict):
    model: str
    messages: Annotated[list[AnthropicMessage], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: Thinking | None = hint()
    output_config: OutputConfig | None = None
    cache_control: CacheControl | None = hint()
    context_management: ContextManagement | None = None

    @model_validator(mode="after")
    def _no_prefill(self):
        turns = [m for m in self.messages if m.role != "system"]
        if not turns:
            raise ValueError("there is no user message, only system ones")
        if turns[-1].role == "assistant":
            raise ValueError("the last message is the assistant's: mtpd does not continue a prefilled answer")
        return self

    def system_prompt(self) -> str:
        """`system`, then the text of each system message in `messages`, in order, a blank line apart."""
        parts = [self.system] if isinstance(self.system, str) else ["".join(b.text for b in self.system or [])]
        for m in self.messages:
            if m.role == "system":
                parts.append(m.content if isinstance(m.content, str) else "".join(b.text for b in m.content))
        return "\n\n".join(p for p in parts if p)

    def as_chat(self, **fields) -> ChatRequest:
        """The same conversation as an OpenAI chat request."""
        system = self.system_prompt()
        messages = [Message(role="system", content=system)] if system else []
        for m in self.messages:
            messages += m.as_chat() if m.role != "system" else []
        choice = self.tool_choice
        return ChatRequest(
            model=self.model, messages=messages,
            tools=[t.as_chat() for t in self.tools] if self.tools else None,
            tool_choice=choice.as_chat() if choice else None,
            parallel_tool_calls=False if choice and choice.disable_parallel_tool_use else None,
            response_format=self._response_format(), **fields)

    def _response_format(self) -> ResponseFormat | None:
        if self.output_config is None or self.output_config.format is None:
            return None
        schema = JsonSchemaFormat(name="output", schema=self.output_config.format.schema_)
        return ResponseFormat(type="json_schema", json_schema=schema)


class MessagesRequest(CountTokensRequest):
    max_tokens: Annotated[int, Field(ge=1)]
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None  # sent by clients of the older API
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    metadata: Metadata | None = hint()
    service_tier: Literal["auto", "standard_only"] | None = hint()
    speed: Literal["standard"] | None = None  # mtpd's one speed is as fast as speculation makes it
    speculation: str | None = None  # extension: adaptive | off | fixed:K

    def chat(self) -> ChatRequest:
        chat = self.as_chat(max_tokens=self.max_tokens, stream=self.stream, temperature=self.temperature,
                            top_p=self.top_p, top_k=self.top_k, speculation=self.speculation)
        chat.stop = self.stop_sequences  # Anthropic allows more stop strings than OpenAI's four
        return chat


# -- responses --------------------------------------------------------------------------------------


def message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


def tool_use_block(call: dict) -> dict:
    """An OpenAI tool call (daemon.server.tool_calls) as a tool_use block."""
    arguments = call["function"]["arguments"]
    try:
        given = partial_loads(arguments) if arguments else {}  # a call cut short: its input as far as it got
    except ValueError:
        given = None
    return {"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"), "name": call["function"]["name"],
            "input": given if isinstance(given, dict) else {"arguments": arguments}}


def stop_reason(done: Finished, called: bool) -> str:
    if done.finish_reason == "length":
        return "max_tokens"
    if done.stop_sequence is not None:
        return "stop_sequence"
    return "tool_use" if called else "end_turn"


def usage(done: Finished | None, prompt_tokens: int) -> dict:
    cached = done.cached_tokens if done else 0
    return {"input_tokens": prompt_tokens - cached, "output_tokens": done.completion_tokens if done else 0,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def message(rid: str, model: str, content: list[dict], done: Finished | None, prompt_tokens: int,
            called: bool = False, extension: dict | None = None, context_management: dict | None = None) -> dict:
    """The message body; with `done` None, the one message_start carries (no stop reason yet).
    `context_management`: the edits applied, for a request that asked for any."""
    body = {"id": rid, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason(done, called) if done else None,
            "stop_sequence": done.stop_sequence if done else None, "usage": usage(done, prompt_tokens)}
    return body | ({"context_management": context_management} if context_management else {}) | (
        {"mtpd": extension} if extension else {})


KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
         504: "timeout_error"}


def error_body(e: ApiError) -> dict:
    kind = KINDS.get(e.status, "invalid_request_error" if e.status < 500 else "api_error")
    if isinstance(e, PromptTooLong):  # Anthropic's own words, which Claude Code reads as "compact now"
        return {"type": "error", "error": {"type": kind,
                                           "message": f"prompt is too long: {e.tokens} tokens > {e.maximum} maximum"}}
    return {"type": "error", "error": {"type": kind, "message": e.message}}

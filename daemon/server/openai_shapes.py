"""The OpenAI API's shapes: request bodies (validated with pydantic; hints accepted and reported:
daemon.server.hints) and response / SSE chunk bodies. Pure data, no HTTP and no MLX."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from daemon.engine.records import Delta, Finished, origins
from daemon.engine.sampling import TokenLogprob
from daemon.server.hints import hint


class ApiError(Exception):
    """An error the client caused or must hear about, in OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def kind(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 404:
            return "not_found_error"
        if self.status in (429, 503):
            return "rate_limit_error" if self.status == 429 else "service_unavailable_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class PromptTooLong(ApiError):
    """A prompt past the model's context; Anthropic's API words it its own way (anthropic_shapes)."""

    def __init__(self, tokens: int, maximum: int, param: str):
        super().__init__(400, f"the prompt has {tokens} tokens; this model's context is {maximum} tokens", param,
                         "context_length_exceeded")
        self.tokens, self.maximum = tokens, maximum


class Strict(BaseModel):
    """A field we do not know is refused (400 naming it), never ignored."""

    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    # _tool_fields' rules, for the document: a tool turn names its call, only an assistant's carries calls
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"properties": {"role": {"const": "tool"}}},
         "then": {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string", "minLength": 1}}}},
        {"if": {"properties": {"role": {"not": {"const": "assistant"}}}},
         "then": {"properties": {"tool_calls": {"anyOf": [{"type": "null"}, {"maxItems": 0}]}}}}]})

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None  # an assistant turn's, sent back as it came
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn's: the call it answers

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def as_dict(self) -> dict:
        """For the chat template: OpenAI's names, a call's arguments as a JSON object."""
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionDef(Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Strict):
    include_usage: bool = False
    include_origins: bool = False  # extension: each chunk's tokens, and where each came from (docs/serving.md)


class _Common(Strict):
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None  # OpenAI's range (int64)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(json_schema_extra={"const": 1})] = 1
    user: str | None = hint()  # identifiers and metadata change nothing
    metadata: dict[str, str] | None = hint()
    safety_identifier: str | None = hint()
    prompt_cache_key: str | None = hint()  # mtpd's prompt cache matches prefixes by itself
    service_tier: Annotated[str | None, Field(json_schema_extra={"enum": ["auto", "default", None]})] = hint()
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = hint()  # no reasoning
    store: Annotated[bool | None, Field(json_schema_extra={"enum": [False, None]})] = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None  # extension, as mlx-lm's and vLLM's servers
    speculation: str | None = None  # extension: adaptive | off | fixed:K

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n = 1 is supported")
        return n

    @field_validator("seed")
    @classmethod
    def _unsigned(cls, seed):
        """MLX's PRNG key takes an unsigned 64-bit seed: a negative one is taken modulo 2**64."""
        return None if seed is None else seed % 2**64

    @field_validator("store")
    @classmethod
    def _not_stored(cls, store):
        if store:
            raise ValueError("mtpd stores no completions; leave it unset or false")
        return store

    @field_validator("service_tier")
    @classmethod
    def _one_tier(cls, tier):
        if tier not in (None, "auto", "default"):
            raise ValueError("mtpd has one service tier: 'auto' or 'default'")
        return tier

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias):
        if bias and not all(k.isascii() and k.isdigit() for k in bias):  # not "²", which int() refuses
            raise ValueError("the keys are token ids, as strings")
        return bias

    def bias(self, vocab: int) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs, each id checked against the vocabulary."""
        pairs = tuple((int(k), v) for k, v in (self.logit_bias or {}).items())
        if any(t >= vocab for t, _ in pairs):
            raise ApiError(400, f"logit_bias: token ids must be in [0, {vocab})", "logit_bias")
        return pairs

    @property
    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    @property
    def include_origins(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_origins

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class JsonSchemaFormat(Strict):
    name: str
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    def forced_tool(self) -> str | None:
        """"required": "" (any tool); a named function: its name; else None. Checked against the tools."""
        if self.tool_choice in (None, "auto", "none"):
            return None
        if not self.tools:
            raise ApiError(400, "tool_choice: it needs tools", "tool_choice")
        if self.tool_choice == "required":
            return ""
        name = self.tool_choice.function.name
        if name not in {t.function.name for t in self.tools}:
            raise ApiError(400, f"tool_choice: {name!r} is not among the tools", "tool_choice")
        return name

    def tool_dicts(self) -> list[dict] | None:
        """The tools the model is shown (none when tool_choice is "none")."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Common):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | Annotated[list[int], Field(min_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    def logprob_count(self) -> int | None:
        return self.logprobs


def parse(model: type[_Common], raw: bytes) -> _Common:
    """Validates a request body; any problem is a 400 naming the parameter."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {err['msg']}") from None
        # without the union branches pydantic names ("function-after[...]", "list[...]", "literal[...]")
        loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "constrained-")) and "[" not in str(p)]
        param = ".".join(loc[:3]) or None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "mtpd does not support this field"
        raise ApiError(400, f"{param}: {msg}" if param else msg, param) from None


# -- responses --------------------------------------------------------------------------------------


def usage(done: Finished) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def speculation_figures(done: Finished, policy: str) -> dict:
    """The extension object: what speculation did for this request."""
    return {
        "speculation": policy,
        "drafted_tokens": done.stats.drafted,
        "accepted_tokens": done.stats.accepted,
        "acceptance_rate": _rounded(done.stats.acceptance_rate, 4),
        "lookup_drafted_tokens": done.stats.lookup_drafted,
        "lookup_accepted_tokens": done.stats.lookup_accepted,
        "time_to_first_token_s": round(done.ttft_seconds, 4),
        "tokens_per_second": round(done.tokens_per_second, 2),
    }


def chat_logprobs(entries: list[TokenLogprob], text_of) -> dict:
    def one(token: int, logprob: float) -> dict:
        text = text_of(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: list[TokenLogprob], text_of, offset: int = 0) -> dict:
    tokens = [text_of(e.token) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{text_of(t): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def _envelope(head: tuple, obj: str, choices: list, **extra) -> dict:
    """head: (id, created, model)."""
    rid, created, model = head
    return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None,
            "choices": choices, **extra}


def chat_response(head, text, done: Finished, logprobs, extension, tool_calls=None) -> dict:
    message = {"role": "assistant", "content": text or (None if tool_calls else ""), "refusal": None}
    finish = done.finish_reason
    if tool_calls:
        message["tool_calls"] = tool_calls
        finish = "tool_calls" if finish == "stop" else finish
    choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
    return _envelope(head, "chat.completion", [choice], usage=usage(done), mtpd=extension)


def chat_chunk(head, delta: dict, finish_reason=None, logprobs=None) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return _envelope(head, "chat.completion.chunk", [choice])


def completion_response(head, text, done: Finished, logprobs, extension) -> dict:
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": done.finish_reason}
    return _envelope(head, "text_completion", [choice], usage=usage(done), mtpd=extension)


def completion_chunk(head, text, finish_reason=None, logprobs=None) -> dict:
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return _envelope(head, "text_completion", [choice])


def token_origins(delta: Delta) -> dict:
    """A streamed chunk's extension with stream_options.include_origins: its step's kept tokens, each
    one's text and origin, and the step's round (drafts verified, accepted, by which source)."""
    source = ("lookup" if delta.lookup else "mtp") if delta.drafted else None
    return {"token_ids": list(delta.token_ids), "pieces": list(delta.pieces), "origins": list(origins(delta)),
            "round": {"drafted": delta.drafted, "accepted": delta.accepted, "source": source}}


def usage_chunk(head, obj: str, done: Finished, extension) -> dict:
    return _envelope(head, obj, [], usage=usage(done), mtpd=extension)

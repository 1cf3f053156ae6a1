"""The response bodies the server sends, as pydantic models: what /openapi.json documents (the
shape functions in openai_shapes.py and anthropic_shapes.py build the same dicts by hand, on the
hot path; tests/test_openapi_fuzz.py holds the two together). Pure data."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, RootModel

FinishReason = Literal["stop", "length", "tool_calls"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body (every path but /v1/messages)."""

    error: ErrorDetail


class Speculation(BaseModel):
    """mtpd's extension: what speculation did for this request."""

    speculation: str
    drafted_tokens: int
    accepted_tokens: int
    acceptance_rate: float | None
    lookup_drafted_tokens: int
    lookup_accepted_tokens: int
    time_to_first_token_s: float
    tokens_per_second: float


class Round(BaseModel):
    drafted: int = Field(description="the step's drafts, verified (0: a plain step)")
    accepted: int = Field(description="of them, accepted")
    source: Literal["mtp", "lookup"] | None = Field(description="the drafter, or copied by the context lookup or phrasebook")


class TokenOrigins(BaseModel):
    """mtpd's extension on a streamed chunk, with stream_options.include_origins: one step's tokens."""

    token_ids: list[int]
    pieces: list[str] = Field(description="each token's text as released (their join is the step's text)")
    origins: list[Literal["target", "draft", "lookup"]]
    round: Round


class CachedTokens(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: CachedTokens


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None


class CalledFunction(BaseModel):
    name: str
    arguments: str = Field(description="JSON text")


class CalledTool(BaseModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: None
    tool_calls: list[CalledTool] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class _Envelope(BaseModel):
    id: str
    created: int = Field(description="Unix seconds")
    model: str
    system_fingerprint: None


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage
    mtpd: Speculation


class ChunkToolCall(CalledTool):
    index: int


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Envelope):
    """A streamed chat event; the last, with stream_options.include_usage, has no choices but the usage."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    mtpd: Speculation | TokenOrigins | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(_Envelope):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage
    mtpd: Speculation


class CompletionChunkChoice(CompletionChoice):
    finish_reason: FinishReason | None


class CompletionChunk(_Envelope):
    object: Literal["text_completion"]
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None
    mtpd: Speculation | TokenOrigins | None = None


class ChatStreamData(RootModel[ChatCompletionChunk | ErrorResponse]):
    """One SSE event's data (or "[DONE]"): a chunk, or the error that ended the stream after the headers."""


class CompletionStreamData(RootModel[CompletionChunk | ErrorResponse]):
    """One SSE event's data (or "[DONE]"): a chunk, or the error that ended the stream after the headers."""


class LastSpeculation(BaseModel):
    policy: str
    drafted_steps: int
    completion_tokens: int
    drafted: int = Field(description="drafts verified")
    accepted: int = Field(description="of them, accepted")


class HealthMemory(BaseModel):
    """Bytes (daemon.engine.memory): the process's resident set, MLX's, the prompt cache's (part of MLX's active)."""

    rss_bytes: int
    mlx_active_bytes: int
    mlx_cache_bytes: int
    mlx_peak_bytes: int
    prompt_cache_bytes: int


class SpeedPaths(BaseModel):
    forms: str = Field(description="stock (as mlx-lm runs it), or fast_blocks, column_major, numpy_attention joined by +")
    probe_ms: dict[str, float] = Field(description="each form's forward of 1 + 3 rows, and long attention by MLX and "
                                                   "by NumPy: a prefill chunk (long_attention_mlx / _numpy) and a "
                                                   "5-row verification (long_attention_mlx_few / _numpy_few), ms")


class LoadedModelInfo(BaseModel):
    name: str
    bytes: int = Field(description="its weights, measured at load")


class Health(BaseModel):
    """503 with status "rank lost" (and the error) when a rank of the cluster is gone."""

    status: Literal["ok", "rank lost"]
    error: str | None = None
    placement: str | None = Field(None, description="over several machines: how the model is shared out")
    speed_paths: SpeedPaths | None = Field(None, description="the faster forms the start-up probe kept")
    model: str
    drafter: str | None
    speculation: str
    uptime_s: float
    requests_served: int
    completion_tokens: int
    acceptance_rate: float | None
    last_request_speculation: LastSpeculation | None
    running: int
    waiting: int
    busy: bool
    memory: HealthMemory
    loaded_models: list[LoadedModelInfo]
    loading: int = Field(description="requests waiting for their model to load")


# -- Anthropic's Messages API -----------------------------------------------------------------------


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    """Anthropic's error body (under /v1/messages)."""

    type: Literal["error"]
    error: AnthropicErrorDetail


class TextContent(BaseModel):
    type: Literal["text"]
    text: str


class ToolUseContent(BaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict


class AnthropicUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int


class AppliedEdit(BaseModel):
    type: Literal["clear_tool_uses_20250919"]
    cleared_tool_uses: int
    cleared_input_tokens: int


class ContextManagementResponse(BaseModel):
    """The context edits applied (daemon.server.context_edits), for a request that asked for any."""

    applied_edits: list[AppliedEdit]


class AnthropicMessageResponse(BaseModel):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[TextContent | ToolUseContent]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None
    usage: AnthropicUsage
    context_management: ContextManagementResponse | None = None
    mtpd: Speculation | None = None


class TokenCount(BaseModel):
    input_tokens: int


class MessageStart(BaseModel):
    type: Literal["message_start"]
    message: AnthropicMessageResponse


class ContentBlockStart(BaseModel):
    type: Literal["content_block_start"]
    index: int
    content_block: TextContent | ToolUseContent


class TextDelta(BaseModel):
    type: Literal["text_delta"]
    text: str


class InputJsonDelta(BaseModel):
    type: Literal["input_json_delta"]
    partial_json: str


class ContentBlockDelta(BaseModel):
    type: Literal["content_block_delta"]
    index: int
    delta: TextDelta | InputJsonDelta


class ContentBlockStop(BaseModel):
    type: Literal["content_block_stop"]
    index: int


class StopDelta(BaseModel):
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
    stop_sequence: str | None


class MessageDelta(BaseModel):
    type: Literal["message_delta"]
    delta: StopDelta
    usage: AnthropicUsage
    context_management: ContextManagementResponse | None = None
    mtpd: Speculation


class MessageStop(BaseModel):
    type: Literal["message_stop"]


class Ping(BaseModel):
    type: Literal["ping"]


class MessageStreamData(RootModel[Annotated[
        MessageStart | ContentBlockStart | ContentBlockDelta | ContentBlockStop | MessageDelta | MessageStop | Ping
        | AnthropicError, Field(discriminator="type")]]):
    """One SSE event's data; the event's name is its `type`."""

"""The Responses API's response object and stream events as pydantic models: what /openapi.json
documents for POST /v1/responses (responses_shapes.py builds the same dicts by hand;
tests/test_openapi_fuzz.py holds the two together). Pure data."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, RootModel

from daemon.server.response_models import Speculation


class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list
    logprobs: list


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    id: str
    type: Literal["function_call"]
    status: Literal["in_progress", "completed"]
    call_id: str
    name: str
    arguments: str = Field(description="JSON text")


OutputItem = Annotated[OutputMessage | OutputFunctionCall, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: Literal[0]


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    """A response; the request's settings are echoed, as OpenAI's API does."""

    id: str
    object: Literal["response"]
    created_at: int = Field(description="Unix seconds")
    status: Literal["in_progress", "completed", "incomplete"]
    error: None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: dict
    store: bool
    temperature: float
    text: dict
    tool_choice: str | dict
    tools: list[dict]
    top_p: float
    truncation: Literal["disabled"]
    usage: ResponseUsage | None
    user: str | None
    metadata: dict[str, str]
    mtpd: Speculation | None = None


class _Event(BaseModel):
    sequence_number: int


class ResponseLifecycle(_Event):
    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete"]
    response: ResponseObject


class ItemEvent(_Event):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem


class _InItem(_Event):
    item_id: str
    output_index: int


class PartEvent(_InItem):
    type: Literal["response.content_part.added", "response.content_part.done"]
    content_index: int
    part: OutputText


class TextDeltaEvent(_InItem):
    type: Literal["response.output_text.delta"]
    content_index: int
    delta: str
    logprobs: list


class TextDoneEvent(_InItem):
    type: Literal["response.output_text.done"]
    content_index: int
    text: str
    logprobs: list


class ArgumentsDeltaEvent(_InItem):
    type: Literal["response.function_call_arguments.delta"]
    delta: str


class ArgumentsDoneEvent(_InItem):
    type: Literal["response.function_call_arguments.done"]
    name: str
    arguments: str


class ResponseErrorEvent(_Event):
    """An error after the headers."""

    type: Literal["error"]
    code: str | None
    message: str
    param: str | None


class ResponseStreamData(RootModel[Annotated[
        ResponseLifecycle | ItemEvent | PartEvent | TextDeltaEvent | TextDoneEvent | ArgumentsDeltaEvent
        | ArgumentsDoneEvent | ResponseErrorEvent, Field(discriminator="type")]]):
    """One SSE event's data; the event's name is its `type`."""

"""OpenAI's Responses API shapes: the request (validated with pydantic, every unknown field refused,
hints accepted and reported: daemon.server.hints), its input items turned into the chat request the
engine path already serves, and the response object with its output items. Pure data, no HTTP and
no MLX."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from daemon.engine.records import Finished
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
    ResponseFormat,
    Strict,
    Tool,
    ToolCall,
)

ITEM_TYPES = ("message", "function_call", "function_call_output")
ItemStatus = Literal["in_progress", "completed", "incomplete"]


class ContentPart(Strict):
    """A message's text part: `input_text`, or `output_text` in an answer sent back as input."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list | None = None  # an output_text's, sent back as it came
    logprobs: list | None = None


class MessageItem(Strict):
    type: Literal["message"] = "message"  # "easy" input messages leave it out
    role: Literal["user", "assistant", "system", "developer"]
    content: list[ContentPart] | str  # the list first: a bad part is what a 400 names
    id: str | None = None
    status: ItemStatus | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1)]
    name: str
    arguments: str  # JSON text
    id: str | None = None
    status: ItemStatus | None = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1)]  # it becomes a tool turn's tool_call_id, which must be set
    output: list[ContentPart] | str
    id: str | None = None
    status: ItemStatus | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


def _item_type(value) -> str:
    return value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")


def _tag(value) -> str:
    """The union branch, bracketed: a 400's parameter path leaves it out (openai_shapes.parse)."""
    return f"[{_item_type(value)}]"


Item = Annotated[
    Annotated[MessageItem, Tag("[message]")] | Annotated[FunctionCallItem, Tag("[function_call]")]
    | Annotated[FunctionCallOutputItem, Tag("[function_call_output]")],
    Discriminator(_tag)]


def as_messages(items: list) -> list[Message]:
    """Chat messages for input items, in order: a function call joins the assistant turn before it
    (or opens one), its output is a tool turn."""
    out: list[Message] = []
    for item in items:
        if item.type == "message":
            out.append(Message(role=item.role, content=item.text()))
        elif item.type == "function_call_output":
            out.append(Message(role="tool", content=item.text(), tool_call_id=item.call_id))
        else:
            call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
            if not out or out[-1].role != "assistant":
                out.append(Message(role="assistant", content=None))
            out[-1].tool_calls = [*(out[-1].tool_calls or []), call]
    return out


class FunctionTool(Strict):
    """The Responses API's function tool: flat, not chat's {"type", "function": {...}}."""

    type: Literal["function"]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None  # forced calls follow the schema whatever it says

    def as_chat(self) -> Tool:
        return Tool(type="function", function=FunctionDef(name=self.name, description=self.description,
                                                          parameters=self.parameters, strict=self.strict))


class HostedTool(BaseModel):
    """A tool the API's own servers run (web_search, file_search, code_interpreter, ...): nothing
    here runs it, so it is accepted, left out of the prompt and reported as unused."""

    model_config = ConfigDict(extra="allow")
    type: str = hint(name="tools (hosted)")


class NamespaceTool(Strict):
    """A named group of tools (Codex's `namespace`): its function tools are offered as any others."""

    type: Literal["namespace"]
    name: str
    description: str | None = None
    tools: list[Annotated[Annotated[FunctionTool, Tag("[function]")] | Annotated[HostedTool, Tag("[hosted]")],
                          Discriminator(lambda v: _tool_kind(v, nested=True))]]


def _tool_kind(value, nested: bool = False) -> str:
    """The union branch of a tool, bracketed as `_tag`'s."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"[{kind}]" if kind == "function" or (kind == "namespace" and not nested) else "[hosted]"


AnyTool = Annotated[Annotated[FunctionTool, Tag("[function]")] | Annotated[NamespaceTool, Tag("[namespace]")]
                    | Annotated[HostedTool, Tag("[hosted]")], Discriminator(_tool_kind)]


def function_tools(tools: list) -> list[FunctionTool]:
    """The function tools offered, those of namespaces included, in order."""
    out = []
    for tool in tools:
        if isinstance(tool, NamespaceTool):
            out += function_tools(tool.tools)
        elif isinstance(tool, FunctionTool):
            out.append(tool)
    return out


class NamedFunctionChoice(Strict):
    type: Literal["function"]
    name: str


class TextFormat(Strict):
    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_named(self):
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a json_schema format needs its name and schema")
        if self.type != "json_schema" and (self.name, self.schema_) != (None, None):
            raise ValueError("name and schema go with type 'json_schema', and only with it")
        return self

    def as_chat(self) -> ResponseFormat:
        schema = None
        if self.type == "json_schema":
            schema = JsonSchemaFormat(name=self.name, description=self.description, schema=self.schema_,
                                      strict=self.strict)
        return ResponseFormat(type=self.type, json_schema=schema)


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = hint()  # a reasoning model's; none is served


class Reasoning(Strict):
    """A hint: the served models have no reasoning to spend an effort on or to summarize."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(Strict):
    model: str | None = None
    input: list[Item] | str  # the list first: a bad item's error is the one reported, not "not a string"
    instructions: str | None = None
    tools: list[AnyTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stream: bool = False
    previous_response_id: str | None = None
    store: bool = True  # kept for a later previous_response_id (daemon.server.response_store)
    metadata: dict[str, str] | None = hint()
    user: str | None = hint()
    safety_identifier: str | None = hint()
    prompt_cache_key: str | None = hint()  # mtpd's prompt cache matches prefixes by itself
    service_tier: Literal["auto", "default"] | None = hint()
    reasoning: Reasoning | None = hint()
    truncation: Literal["auto", "disabled"] | None = hint()  # never truncated: a prompt past the context is a 400
    # what a reasoning model or a hosted tool would add to the output: there is none here
    include: list[Literal["reasoning.encrypted_content", "web_search_call.results", "web_search_call.action.sources",
                          "file_search_call.results", "code_interpreter_call.outputs",
                          "computer_call_output.output.image_url", "message.input_image.image_url"]] | None = hint()
    client_metadata: dict | None = hint()  # Codex's session ids
    speculation: str | None = None  # extension: adaptive | off | fixed:K

    @field_validator("input", mode="before")
    @classmethod
    def _known_items(cls, value):
        """An item of a type mtpd does not serve (an image, a reasoning item, a hosted tool's call) is named."""
        for i, item in enumerate(value if isinstance(value, list) else []):
            if isinstance(item, dict) and _item_type(item) not in ITEM_TYPES:
                raise ValueError(f"item {i} has type {_item_type(item)!r}; mtpd serves {', '.join(ITEM_TYPES)}")
        return value

    def items(self) -> list:
        """`input` as items (a string is one user message)."""
        return [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else list(self.input)

    def as_chat(self, history: list) -> ChatRequest:
        """The conversation (`history`: the previous response's items, then this input) as a chat
        request; the instructions are this request's own, never carried over (as OpenAI's)."""
        messages = ([Message(role="system", content=self.instructions)] if self.instructions else [])
        messages += as_messages(history + self.items())
        if not messages:
            raise ApiError(400, "input: there is nothing to answer (no items, instructions or previous response)",
                           "input")
        choice, offered = self.tool_choice, function_tools(self.tools or [])
        return ChatRequest(
            model=self.model, messages=messages, stream=self.stream, max_tokens=self.max_output_tokens,
            temperature=self.temperature, top_p=self.top_p, speculation=self.speculation,
            tools=[t.as_chat() for t in offered] or None,
            tool_choice=(NamedToolChoice(type="function", function=NamedFunction(name=choice.name))
                         if isinstance(choice, NamedFunctionChoice) else choice),
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=self.text.format.as_chat() if self.text and self.text.format else None)


# -- responses --------------------------------------------------------------------------------------


def response_id() -> str:
    return "resp_" + uuid.uuid4().hex[:24]


def message_item(status: ItemStatus = "in_progress") -> dict:
    """An empty assistant message item, with an id of its own."""
    return {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant", "status": status,
            "content": []}


def text_part(text: str = "") -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(call: dict) -> dict:
    """An OpenAI tool call (daemon.server.tool_calls) as a function_call item."""
    return {"id": "fc_" + call["id"].removeprefix("call_"), "type": "function_call", "status": "completed",
            "call_id": call["id"], "name": call["function"]["name"], "arguments": call["function"]["arguments"]}


def usage(done: Finished) -> dict:
    return {"input_tokens": done.prompt_tokens, "input_tokens_details": {"cached_tokens": done.cached_tokens},
            "output_tokens": done.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def response(head: tuple, body: ResponsesRequest, output: list[dict], done: Finished | None, temperature: float,
             extension: dict | None = None) -> dict:
    """The response object: `head` is (id, created, model); with `done` None, the one in progress
    (response.created); the request's settings echoed, as the API does (`temperature` as applied)."""
    rid, created, model = head
    status = "in_progress" if done is None else "incomplete" if done.finish_reason == "length" else "completed"
    tool_choice = body.tool_choice or "auto"
    return {
        "id": rid, "object": "response", "created_at": created, "status": status, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": model,
        "output": output, "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None}, "store": body.store,
        "temperature": temperature,
        "text": {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)
                 if body.text and body.text.format else {"type": "text"}},
        "tool_choice": tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump(),
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
        "top_p": 1.0 if body.top_p is None else body.top_p, "truncation": "disabled",
        "usage": usage(done) if done is not None else None, "user": body.user, "metadata": body.metadata or {},
    } | ({"mtpd": extension} if extension else {})

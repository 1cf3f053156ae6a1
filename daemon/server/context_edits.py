"""Anthropic's context editing (`context_management`, beta `context-management-2025-06-27`): the
request's shape, and its edits.

- `clear_tool_uses_20250919`, which a small local context needs most, is applied: once the prompt
  passes the trigger, every tool use but the last `keep` has its result replaced by a placeholder
  (and, with `clear_tool_inputs`, its input emptied), as Anthropic does before the prompt reaches
  the model; the client keeps its full history.
- `clear_thinking_20251015` (Claude Code sends it with every request) clears thinking blocks, which
  the served models never write: it is a hint (daemon.server.hints), checked and reported unused.
- Any other edit is refused by name.

Pure data: prompts are counted by a function the caller passes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

from daemon.server.hints import hint
from daemon.server.openai_shapes import Strict

CLEAR_TOOL_USES = "clear_tool_uses_20250919"
CLEAR_THINKING = "clear_thinking_20251015"
PLACEHOLDER = "[tool result cleared to save context]"


class InputTokens(Strict):
    type: Literal["input_tokens"]
    value: Annotated[int, Field(ge=0)]


class ToolUses(Strict):
    type: Literal["tool_uses"]
    value: Annotated[int, Field(ge=0)]


class ClearToolUses(Strict):
    """Anthropic's defaults: triggered past 100,000 input tokens, the last 3 tool uses kept."""

    type: Literal["clear_tool_uses_20250919"]
    trigger: Annotated[InputTokens | ToolUses, Field(discriminator="type")] = InputTokens(type="input_tokens",
                                                                                          value=100_000)
    keep: ToolUses = ToolUses(type="tool_uses", value=3)
    clear_at_least: InputTokens | None = None  # no edit unless it clears at least this many tokens
    exclude_tools: list[str] | None = None  # tools whose uses are never cleared
    clear_tool_inputs: bool | list[str] | None = None  # also empty the inputs (of all, or of these tools)

    def triggered(self, tokens: int, uses: int) -> bool:
        return (tokens if self.trigger.type == "input_tokens" else uses) > self.trigger.value

    def clears_input(self, tool: str) -> bool:
        inputs = self.clear_tool_inputs
        return tool in inputs if isinstance(inputs, list) else bool(inputs)


class ThinkingTurns(Strict):
    type: Literal["thinking_turns"]
    value: Annotated[int, Field(ge=1)]


class AllThinkingTurns(Strict):
    type: Literal["all"]


class ClearThinking(Strict):
    type: Literal["clear_thinking_20251015"] = hint(..., name="context_management." + CLEAR_THINKING)
    keep: Literal["all"] | Annotated[ThinkingTurns | AllThinkingTurns, Field(discriminator="type")] | None = None


class ContextManagement(Strict):
    edits: list[Annotated[ClearToolUses | ClearThinking, Field(discriminator="type")]] = []

    @field_validator("edits", mode="before")
    @classmethod
    def _implemented(cls, edits):
        for edit in edits if isinstance(edits, list) else []:
            kind = edit.get("type") if isinstance(edit, dict) else None
            if kind not in (CLEAR_TOOL_USES, CLEAR_THINKING):
                raise ValueError(f"mtpd does not implement the context edit {kind!r}; it applies {CLEAR_TOOL_USES}")
        return edits


def apply_edits(body, count: Callable[[list], int]):
    """(`body` with its `context_management` edits applied in order, {"applied_edits": [...]}) in
    Anthropic's response shape; `count(messages)` is the prompt's tokens with those messages."""
    messages, applied = body.messages, []
    for edit in body.context_management.edits:
        if edit.type == CLEAR_TOOL_USES:
            messages, report = clear_tool_uses(messages, edit, count)
            applied += [report] if report else []
    return body.model_copy(update={"messages": messages}), {"applied_edits": applied}


def clear_tool_uses(messages: list, edit: ClearToolUses, count: Callable[[list], int]) -> tuple[list, dict | None]:
    """(`messages` edited, the applied edit's report) or (`messages`, None) when the edit does not
    trigger or would clear less than `clear_at_least`. `count(messages)` is the prompt's tokens."""
    uses = [b for m in messages if isinstance(m.content, list) for b in m.content if b.type == "tool_use"]
    before = count(messages)
    if not edit.triggered(before, len(uses)):
        return messages, None
    kept = max(len(uses) - edit.keep.value, 0)
    cleared = {b.id: b.name for b in uses[:kept] if b.name not in (edit.exclude_tools or [])}
    edited = [_cleared(m, cleared, edit) for m in messages]
    freed = before - count(edited)
    if not cleared or (edit.clear_at_least is not None and freed < edit.clear_at_least.value):
        return messages, None
    return edited, {"type": CLEAR_TOOL_USES, "cleared_tool_uses": len(cleared), "cleared_input_tokens": freed}


def _cleared(message: BaseModel, cleared: dict[str, str], edit: ClearToolUses) -> BaseModel:
    if not isinstance(message.content, list):
        return message
    blocks = []
    for b in message.content:
        if b.type == "tool_result" and b.tool_use_id in cleared:
            b = b.model_copy(update={"content": PLACEHOLDER, "is_error": None})
        elif b.type == "tool_use" and b.id in cleared and edit.clears_input(b.name):
            b = b.model_copy(update={"input": {}})
        blocks.append(b)
    return message.model_copy(update={"content": blocks})

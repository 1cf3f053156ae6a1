"""Structured output as grammars for the engine (daemon.engine.grammar): `response_format`
(`json_object`, `json_schema`) and forced tool calls (`tool_choice` "required" or a named
function), written as llguidance grammars: JSON schemas, and Lark for a call's frame."""

from __future__ import annotations

import json

import llguidance

from daemon.server.openai_shapes import ApiError


def _checked(grammar: str, param: str) -> str:
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ApiError(400, f"{param}: the schema is not one mtpd can follow: {error.splitlines()[0]}", param)
    return grammar


def _compact(schema: dict) -> dict:
    """JSON written without free whitespace (", " and ": " between items): a weak model held to a
    schema otherwise can spend its whole answer on newlines and tabs."""
    return {**schema, "x-guidance": {"whitespace_flexible": False, **schema.get("x-guidance", {})}}


def _closed(schema: dict) -> dict:
    """A tool's parameters as the call's grammar takes them: an object whose schema lists its
    properties and says nothing of others takes only those (a weak model otherwise goes on adding
    keys the tool does not have until it runs out of tokens). Still a subset of the schema."""
    if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
        return {**schema, "additionalProperties": False}
    return schema


def response_grammar(response_format) -> str | None:
    """None for plain text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return _checked(llguidance.LLMatcher.grammar_from_json_schema(_compact({"type": "object"})), "response_format")
    if response_format.json_schema is None:
        raise ApiError(400, "response_format: json_schema needs its json_schema object", "response_format")
    schema = response_format.json_schema.schema_ or {"type": "object"}
    return _checked(llguidance.LLMatcher.grammar_from_json_schema(_compact(schema)), "response_format.json_schema")


def tool_call_grammar(tools: list[dict], forced: str, end: str) -> str:
    """What follows a forced call's opening: for a named function (`forced`) its arguments, else
    any tool's {"name": ..., "arguments": ...}; then the closing `end` marker."""
    def arguments(tool):
        return "%json " + json.dumps(_compact(_closed(tool["function"].get("parameters") or {"type": "object"})))

    close = json.dumps("}\n" + end)
    if forced:
        (tool,) = [t for t in tools if t["function"]["name"] == forced]
        return _checked(f"start: {arguments(tool)} {close}\n", "tools")
    lines = ["start: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
    for i, tool in enumerate(tools):
        opening = json.dumps('{"name": ' + json.dumps(tool["function"]["name"]) + ', "arguments": ')
        lines += [f"call_{i}: {opening} args_{i} {close}", f"args_{i}: {arguments(tool)}"]
    return _checked("\n".join(lines) + "\n", "tools")

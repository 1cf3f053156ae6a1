"""Tool calls read back out of the model's text, as it streams: content and calls between the
format's start and end markers, each call parsed by the model family's parser (mlx-lm's) or the
generic JSON one (daemon.models.prompts), shaped as OpenAI's `tool_calls`. A call the answer's room
cut short is kept as far as it got, as OpenAI's API and vLLM do: its name and its arguments' text as
written; the format's markup never reaches the content."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from partial_json_parser import Allow
from partial_json_parser import loads as partial_loads

from daemon.models.prompts import GENERIC_END, GENERIC_START, native_tools


@dataclass(frozen=True)
class ToolFormat:
    start: str
    end: str
    parse: Callable[[str, list], dict]  # a call's text -> {"name": ..., "arguments": dict | str}
    json_calls: bool = True  # a call is {"name": ..., "arguments": {...}} between the markers


def _parse_generic(text: str, tools: list) -> dict:
    return json.loads(text.strip())


def tool_format(tokenizer) -> ToolFormat:
    if native_tools(tokenizer):
        parser = tokenizer.tool_parser
        return ToolFormat(tokenizer.tool_call_start, tokenizer.tool_call_end, parser,
                          getattr(parser, "__module__", "").endswith("json_tools"))
    return ToolFormat(GENERIC_START, GENERIC_END, _parse_generic)


def _held_back(text: str, marker: str) -> int:
    """How many trailing characters of `text` could begin `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ToolCalls:
    """Feeds on the answer's text; yields ("text", str) and ("call", OpenAI tool call) events.
    `opened`: the prompt already wrote the start marker and `prefix` (a forced call)."""

    fmt: ToolFormat
    tools: list
    parallel: bool = True
    opened: bool = False
    prefix: str = ""
    calls: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self._buffer, self._inside = self.prefix, self.opened

    def feed(self, text: str) -> list[tuple[str, object]]:
        self._buffer += text
        out = []
        while True:
            marker = self.fmt.end if self._inside else self.fmt.start
            i = self._buffer.find(marker)
            if i < 0:
                if not self._inside:
                    keep = _held_back(self._buffer, marker)
                    out += self._text(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                return out
            if self._inside:
                out += self._call(self._buffer[:i], self.fmt.start + self._buffer[: i + len(marker)])
            else:
                out += self._text(self._buffer[:i])
            self._buffer, self._inside = self._buffer[i + len(marker) :], not self._inside

    def close(self, cut: bool = False) -> list[tuple[str, object]]:
        """At the end of the answer: a call left open is parsed as it stands, or, `cut` by the
        answer's room, kept as far as it got."""
        rest, self._buffer = self._buffer, ""
        if self._inside:
            return self._call(rest, self.fmt.start + rest, cut)
        return self._text(rest)

    def _text(self, text: str) -> list:
        if not text or (self.calls and not text.strip()):
            return []  # the whitespace between calls
        return [] if self.calls and not self.parallel else [("text", text)]

    def _call(self, body: str, raw: str, cut: bool = False) -> list:
        if self.calls and not self.parallel:
            return []
        try:
            parsed = self.fmt.parse(body, self.tools)
            name, arguments = parsed["name"], parsed.get("arguments", {})
        except (ValueError, KeyError, TypeError, AttributeError):
            if cut:
                return self._partial(body)
            return [("text", raw)]  # not a call after all: the text as the model wrote it
        return self._record(name, arguments if isinstance(arguments, str) else json.dumps(arguments))

    def _partial(self, body: str) -> list:
        """A JSON call cut short: its name, once whole, and its arguments' text so far; else nothing."""
        try:
            head = partial_loads(body, Allow.ALL & ~Allow.STR)  # strings only when closed: a whole name
        except ValueError:
            return []
        if not isinstance(head, dict) or head.get("name") not in {t["function"]["name"] for t in self.tools}:
            return []
        arguments = re.search(r'"arguments"\s*:\s*', body)
        return self._record(head["name"], body[arguments.end() :] if arguments else "")

    def _record(self, name: str, arguments: str) -> list:
        call = {"id": "call_" + uuid.uuid4().hex[:24], "type": "function", "function": {"name": name, "arguments": arguments}}
        self.calls.append(call)
        return [("call", call)]

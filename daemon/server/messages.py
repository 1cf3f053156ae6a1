"""One Anthropic Messages request's response: the job's records collected into a message, or
streamed as Anthropic's events (message_start, content blocks of text and tool_use, message_delta,
message_stop; `ping` while nothing else is sent; an `error` event after the headers). The context
edits applied, for a request that asked for any, are in the message and its message_delta."""

from __future__ import annotations

import json

from aiohttp import web

from daemon.server.anthropic_shapes import error_body, message, tool_use_block
from daemon.server.event_reply import EventReply
from daemon.server.openai_shapes import ApiError, speculation_figures
from daemon.server.prepare import Prepared


class MessagesReply(EventReply):
    """`head` is (id, created, model), as for OpenAI's Reply; `context_management` is
    {"applied_edits": [...]} (daemon.server.context_edits)."""

    def __init__(self, prepared: Prepared, head: tuple, text_of=None, context_management: dict | None = None):
        super().__init__(prepared, head)
        self.context_management = context_management
        self.blocks = Blocks(self.send)

    def _message(self, content: list[dict]) -> dict:
        rid, _, model = self.head
        extension = speculation_figures(self.done, self.prepared.speculation) if self.done else None
        return message(rid, model, content, self.done, len(self.prepared.request.prompt_ids),
                       bool(self.calls and self.calls.calls), extension, self.context_management)

    async def collect(self, stream) -> web.Response:
        events = await self.gather(stream)
        content, text = [], "".join(e for kind, e in events if kind == "text")
        if text:
            content.append({"type": "text", "text": text})
        content += [tool_use_block(e) for kind, e in events if kind == "call"]
        return web.json_response(self._message(content))

    async def keepalive(self) -> None:
        await self.send("ping", {})

    async def opening(self) -> None:
        await self.send("message_start", {"message": self._message([])})

    async def add(self, event: tuple[str, object]) -> None:
        await self.blocks.add(event)

    async def ending(self) -> None:
        await self.blocks.close()
        body = self._message([])
        await self.send("message_delta", {"delta": {"stop_reason": body["stop_reason"],
                                                    "stop_sequence": body["stop_sequence"]},
                                          "usage": body["usage"], "mtpd": body["mtpd"]}
                        | ({"context_management": self.context_management} if self.context_management else {}))
        await self.send("message_stop", {})

    def error_event(self, e: ApiError) -> tuple[str, dict]:
        return "error", {"error": error_body(e)["error"]}


class Blocks:
    """The content blocks of a streamed message: text deltas go to an open text block (opened on
    demand), each tool call is a whole tool_use block."""

    def __init__(self, send):
        self.send, self.index, self.open_text = send, 0, False

    async def add(self, event: tuple[str, object]) -> None:
        kind, value = event
        if kind == "text":
            if not value:
                return
            if not self.open_text:
                await self.send("content_block_start", {"index": self.index, "content_block": {"type": "text", "text": ""}})
                self.open_text = True
            await self.send("content_block_delta", {"index": self.index, "delta": {"type": "text_delta", "text": value}})
            return
        await self.close()
        block = tool_use_block(value)
        await self.send("content_block_start", {"index": self.index, "content_block": {**block, "input": {}}})
        await self.send("content_block_delta", {"index": self.index, "delta": {
            "type": "input_json_delta", "partial_json": json.dumps(block["input"])}})
        await self.send("content_block_stop", {"index": self.index})
        self.index += 1

    async def close(self) -> None:
        """Ends the open text block, if any."""
        if self.open_text:
            await self.send("content_block_stop", {"index": self.index})
            self.index, self.open_text = self.index + 1, False

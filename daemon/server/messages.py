"""One Anthropic Messages request's response: the job's records collected into a message, or
streamed as Anthropic's events (message_start, content blocks of text and tool_use, message_delta,
message_stop; `ping` while nothing else is sent; an `error` event after the headers). The context
edits applied, for a request that asked for any, are in the message and its message_delta."""

from __future__ import annotations

import json

import structlog
from aiohttp import web

from daemon.engine.records import Delta, Finished
from daemon.server.anthropic_shapes import error_body, message, tool_use_block
from daemon.server.openai_shapes import ApiError, speculation_figures
from daemon.server.prepare import Prepared
from daemon.server.streaming import ClientGone


class MessagesReply:
    """`head` is (id, created, model), as for OpenAI's Reply; `context_management` is
    {"applied_edits": [...]} (daemon.server.context_edits)."""

    def __init__(self, prepared: Prepared, head: tuple, text_of=None, context_management: dict | None = None):
        self.prepared, self.head, self.context_management = prepared, head, context_management
        self.done: Finished | None = None
        self.text: list[str] = []  # the answer as the model wrote it
        self.calls = prepared.tool_calls

    def _events(self, text: str) -> list[tuple[str, object]]:
        return self.calls.feed(text) if self.calls is not None else [("text", text)]

    def _closing(self) -> list[tuple[str, object]]:
        return self.calls.close(self.done.finish_reason == "length") if self.calls is not None else []

    def _message(self, content: list[dict]) -> dict:
        rid, _, model = self.head
        extension = speculation_figures(self.done, self.prepared.speculation) if self.done else None
        return message(rid, model, content, self.done, len(self.prepared.request.prompt_ids),
                       bool(self.calls and self.calls.calls), extension, self.context_management)

    async def collect(self, stream) -> web.Response:
        async for record in stream:
            if isinstance(record, Delta):
                self.text.append(record.text)
            else:
                self.done = record
        events = self._events("".join(self.text)) + self._closing()
        content, text = [], "".join(e for kind, e in events if kind == "text")
        if text:
            content.append({"type": "text", "text": text})
        content += [tool_use_block(e) for kind, e in events if kind == "call"]
        return web.json_response(self._message(content))

    async def stream(self, http: web.Request, stream) -> tuple[web.StreamResponse, str]:
        """Returns the response and how it ended ("ok", "client_gone" or an error's status)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(http)

        async def send(event: str, payload: dict) -> None:
            data = json.dumps({"type": event, **payload}, separators=(",", ":"))
            try:
                await response.write(f"event: {event}\ndata: {data}\n\n".encode())
            except ConnectionError:
                raise ClientGone from None

        blocks = Blocks(send)
        status = "ok"
        try:
            await send("message_start", {"message": self._message([])})
            while not isinstance(record := await anext(stream), Finished):
                if record is None:
                    await send("ping", {})
                    continue
                self.text.append(record.text)
                for event in self._events(record.text):
                    await blocks.add(event)
            self.done = record
            for event in self._closing():
                await blocks.add(event)
            await blocks.close()
            body = self._message([])
            await send("message_delta", {"delta": {"stop_reason": body["stop_reason"],
                                                   "stop_sequence": body["stop_sequence"]},
                                         "usage": body["usage"], "mtpd": body["mtpd"]}
                       | ({"context_management": self.context_management} if self.context_management else {}))
            await send("message_stop", {})
        except ApiError as e:  # after the headers: the error goes in the stream
            await send("error", {"error": error_body(e)["error"]})
            status = str(e.status)
        except ClientGone:
            return response, "client_gone"
        except Exception:
            structlog.get_logger().exception("internal error", path=http.path)
            await send("error", {"error": error_body(ApiError(500, "internal server error"))["error"]})
            status = "500"
        await response.write_eof()
        return response, status


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

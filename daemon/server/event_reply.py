"""What the replies streamed as named server-sent events share (Anthropic's Messages:
daemon.server.messages; OpenAI's Responses: daemon.server.responses): the answer read as ("text",
str) and ("call", OpenAI tool call) events (daemon.server.tool_calls), gathered whole or streamed
as `event:` + `data:` pairs, an error after the headers sent as the shape's own error event.
A subclass says what each step sends: `opening`, `add` (one event), `ending`, `error_event`."""

from __future__ import annotations

import json

import structlog
from aiohttp import web

from daemon.engine.records import Delta, Finished
from daemon.server.openai_shapes import ApiError
from daemon.server.prepare import Prepared
from daemon.server.streaming import ClientGone


class EventReply:
    """`head` is (id, created, model), as for OpenAI's Reply."""

    def __init__(self, prepared: Prepared, head: tuple):
        self.prepared, self.head = prepared, head
        self.done: Finished | None = None
        self.text: list[str] = []  # the answer as the model wrote it
        self.calls = prepared.tool_calls
        self.response: web.StreamResponse | None = None

    def events(self, text: str) -> list[tuple[str, object]]:
        return self.calls.feed(text) if self.calls is not None else [("text", text)]

    def closing(self) -> list[tuple[str, object]]:
        return self.calls.close(self.done.finish_reason == "length") if self.calls is not None else []

    async def gather(self, stream) -> list[tuple[str, object]]:
        """The whole answer's events, once the job has finished."""
        async for record in stream:
            if isinstance(record, Delta):
                self.text.append(record.text)
            else:
                self.done = record
        return self.events("".join(self.text)) + self.closing()

    async def write(self, text: str) -> None:
        try:
            await self.response.write(text.encode())
        except ConnectionError:
            raise ClientGone from None

    async def send(self, event: str, payload: dict) -> None:
        """One named event; its data carries the name as `type`."""
        data = json.dumps({"type": event, **payload}, separators=(",", ":"))
        await self.write(f"event: {event}\ndata: {data}\n\n")

    async def keepalive(self) -> None:
        """Sent while nothing else is (the stream yields None then): an SSE comment, unless the shape has its own."""
        await self.write(": keep-alive\n\n")

    async def opening(self) -> None: ...

    async def add(self, event: tuple[str, object]) -> None: ...

    async def ending(self) -> None: ...

    def error_event(self, e: ApiError) -> tuple[str, dict]: ...

    async def stream(self, http: web.Request, stream) -> tuple[web.StreamResponse, str]:
        """Returns the response and how it ended ("ok", "client_gone" or an error's status)."""
        self.response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await self.response.prepare(http)
        status = "ok"
        try:
            await self.opening()
            while not isinstance(record := await anext(stream), Finished):
                if record is None:
                    await self.keepalive()
                    continue
                self.text.append(record.text)
                for event in self.events(record.text):
                    await self.add(event)
            self.done = record
            for event in self.closing():
                await self.add(event)
            await self.ending()
        except ApiError as e:  # after the headers: the error goes in the stream
            await self.send(*self.error_event(e))
            status = str(e.status)
        except ClientGone:
            return self.response, "client_gone"
        except Exception:
            structlog.get_logger().exception("internal error", path=http.path)
            await self.send(*self.error_event(ApiError(500, "internal server error")))
            status = "500"
        await self.response.write_eof()
        return self.response, status

"""One Responses API request's response: the job's records collected into a response object, or
streamed as OpenAI's Responses events (response.created, response.in_progress, each output item
added, its text or arguments as deltas, done; response.completed or response.incomplete), each
with a `sequence_number` counting up from 0; an `error` event after the headers. A response asked
to be stored is kept for a later `previous_response_id` (daemon.server.response_store)."""

from __future__ import annotations

import itertools

from aiohttp import web
from pydantic import TypeAdapter

from daemon.server.event_reply import EventReply
from daemon.server.openai_shapes import ApiError, speculation_figures
from daemon.server.prepare import Prepared
from daemon.server.response_store import ResponseStore
from daemon.server.responses_shapes import Item, ResponsesRequest, function_call_item, message_item, response, text_part

ITEMS = TypeAdapter(list[Item])


class ResponsesReply(EventReply):
    """`conversation`: the items the prompt was made of (the previous response's, then this
    input), kept with the output in `store` unless it is None."""

    def __init__(self, prepared: Prepared, head: tuple, text_of=None, *, body: ResponsesRequest,
                 conversation: list, store: ResponseStore | None):
        super().__init__(prepared, head)
        self.body, self.conversation, self.store = body, conversation, store
        self.sequence = itertools.count()
        self.output = Output(self.send)

    def _response(self) -> dict:
        extension = speculation_figures(self.done, self.prepared.speculation) if self.done else None
        return response(self.head, self.body, self.output.items, self.done, self.prepared.request.sampling.temperature,
                        extension)

    async def _finish(self) -> dict:
        """The finished response, kept if it asked to be."""
        await self.output.close("incomplete" if self.done.finish_reason == "length" else "completed")
        if self.store is not None:
            self.store.put(self.head[0], self.conversation + ITEMS.validate_python(self.output.items))
        return self._response()

    async def collect(self, stream) -> web.Response:
        self.output = Output(None)  # one body, no events
        for event in await self.gather(stream):
            await self.output.add(event)
        return web.json_response(await self._finish())

    async def send(self, event: str, payload: dict) -> None:
        await super().send(event, {**payload, "sequence_number": next(self.sequence)})

    async def opening(self) -> None:
        await self.send("response.created", {"response": self._response()})
        await self.send("response.in_progress", {"response": self._response()})

    async def add(self, event: tuple[str, object]) -> None:
        await self.output.add(event)

    async def ending(self) -> None:
        body = await self._finish()
        await self.send(f"response.{body['status']}", {"response": body})

    def error_event(self, e: ApiError) -> tuple[str, dict]:
        return "error", {"code": e.code, "message": e.message, "param": e.param}


class Output:
    """A response's output items as the answer's events come: text goes to an open message item
    (opened on demand), each tool call is a whole function_call item. Each step is told to `send`
    (a stream's events), unless it is None (one body)."""

    def __init__(self, send):
        self.send, self.items, self.open = send, [], None

    async def _send(self, event: str, payload: dict) -> None:
        if self.send is not None:
            await self.send(event, payload)

    def _where(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.items) - 1}

    async def add(self, event: tuple[str, object]) -> None:
        kind, value = event
        if kind == "text":
            if not value:
                return
            if self.open is None:
                self.open = message_item()
                self.items.append(self.open)
                await self._send("response.output_item.added", {"output_index": len(self.items) - 1,
                                                                "item": self.open})
                self.open["content"].append(text_part())
                await self._send("response.content_part.added", {**self._where(), "content_index": 0,
                                                                 "part": text_part()})
            self.open["content"][0]["text"] += value
            await self._send("response.output_text.delta", {**self._where(), "content_index": 0, "delta": value,
                                                            "logprobs": []})
            return
        await self.close("completed")
        item = function_call_item(value)
        self.items.append(item)
        where = {"item_id": item["id"], "output_index": len(self.items) - 1}
        await self._send("response.output_item.added", {"output_index": where["output_index"],
                                                        "item": {**item, "status": "in_progress", "arguments": ""}})
        await self._send("response.function_call_arguments.delta", {**where, "delta": item["arguments"]})
        await self._send("response.function_call_arguments.done", {**where, "name": item["name"],
                                                                   "arguments": item["arguments"]})
        await self._send("response.output_item.done", {"output_index": where["output_index"], "item": item})

    async def close(self, status: str) -> None:
        """Ends the open message item, if any, with `status`."""
        if self.open is None:
            return
        part, where = self.open["content"][0], self._where()
        self.open["status"] = status
        await self._send("response.output_text.done", {**where, "content_index": 0, "text": part["text"],
                                                       "logprobs": []})
        await self._send("response.content_part.done", {**where, "content_index": 0, "part": part})
        await self._send("response.output_item.done", {"output_index": where["output_index"], "item": self.open})
        self.open = None

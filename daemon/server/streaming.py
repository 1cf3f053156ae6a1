"""The bridge from the engine thread to a response: a job's records as they come, collected into
one JSON body or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from daemon.engine.records import Delta, Finished
from daemon.server.openai_shapes import (
    ApiError,
    chat_chunk,
    chat_logprobs,
    chat_response,
    completion_chunk,
    completion_logprobs,
    completion_response,
    speculation_figures,
    usage_chunk,
)
from daemon.server.prepare import Prepared
from daemon.server.worker import DeadlineExceeded, Job, QueueFull, Worker

POLL_SECONDS = 0.05  # how often a waiting handler checks that its client is still there
GRACE_SECONDS = 5.0  # past the deadline, how long a handler waits for the engine to say so itself


class ClientGone(Exception):
    pass


def submit(worker: Worker, prepared: Prepared, timeout_s: float) -> tuple[Job, asyncio.Queue]:
    """Queues the request for the engine; its records arrive on the returned queue."""
    loop = asyncio.get_running_loop()
    out: asyncio.Queue = asyncio.Queue()
    deadline = time.monotonic() + timeout_s
    job = Job(prepared.request, prepared.speculation, lambda r: loop.call_soon_threadsafe(out.put_nowait, r), deadline)
    try:
        worker.submit(job)
    except QueueFull:
        raise ApiError(503, "the server is busy: too many requests are waiting; retry shortly",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    return job, out


def _closing(http: web.Request) -> bool:
    return http.transport is None or http.transport.is_closing()


async def records(http: web.Request, job: Job, out: asyncio.Queue):
    """The job's records, as they come; raises ClientGone when the client leaves."""
    while True:
        try:
            record = await asyncio.wait_for(out.get(), POLL_SECONDS)
        except TimeoutError:
            if _closing(http):
                raise ClientGone from None
            if time.monotonic() > job.deadline + GRACE_SECONDS:
                raise ApiError(504, "the request timed out", code="timeout") from None
            continue
        if isinstance(record, DeadlineExceeded):
            raise ApiError(504, str(record), code="timeout")
        if isinstance(record, Exception):
            raise record
        yield record
        if isinstance(record, Finished):
            return


class Reply:
    """One request's response: `head` is (id, created, model); `text_of(token)` its text."""

    def __init__(self, prepared: Prepared, head: tuple, text_of):
        self.prepared, self.head, self.text_of = prepared, head, text_of
        self.chat = prepared.kind == "chat"
        self.wants_logprobs = prepared.request.logprobs is not None
        self.done: Finished | None = None
        self.text: list[str] = []

    def extension(self) -> dict:
        return speculation_figures(self.done, self.prepared.speculation)

    async def collect(self, stream) -> web.Response:
        entries = []
        async for record in stream:
            if isinstance(record, Delta):
                self.text.append(record.text)
                entries.extend(record.logprobs)
            else:
                self.done = record
        logprobs = None
        if self.wants_logprobs:
            logprobs = (chat_logprobs if self.chat else completion_logprobs)(entries, self.text_of)
        build = chat_response if self.chat else completion_response
        return web.json_response(build(self.head, "".join(self.text), self.done, logprobs, self.extension()))

    def _chunk(self, record: Delta, offset: int) -> dict:
        if self.chat:
            logprobs = chat_logprobs(list(record.logprobs), self.text_of) if self.wants_logprobs else None
            return chat_chunk(self.head, {"content": record.text}, logprobs=logprobs)
        logprobs = completion_logprobs(list(record.logprobs), self.text_of, offset) if self.wants_logprobs else None
        return completion_chunk(self.head, record.text, logprobs=logprobs)

    def _last_chunks(self) -> list[dict]:
        finish = self.done.finish_reason
        if self.chat:
            chunks = [chat_chunk(self.head, {}, finish_reason=finish)]
        else:
            chunks = [completion_chunk(self.head, "", finish_reason=finish)]
        if self.prepared.body.include_usage:
            obj = "chat.completion.chunk" if self.chat else "text_completion"
            chunks.append(usage_chunk(self.head, obj, self.done, self.extension()))
        return chunks

    async def stream(self, http: web.Request, stream) -> tuple[web.StreamResponse, str]:
        """Server-sent events; returns the response and how it ended ("ok", "client_gone" or the
        status of an error sent in the stream)."""
        first = await anext(stream)  # errors before the first token still get a status code
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(http)

        async def send(payload: dict | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
            try:
                await response.write(f"data: {data}\n\n".encode())
            except ConnectionError:
                raise ClientGone from None

        status, offset, record = "ok", 0, first
        try:
            if self.chat:
                await send(chat_chunk(self.head, {"role": "assistant", "content": ""}))
            while not isinstance(record, Finished):
                self.text.append(record.text)
                if record.text or record.logprobs:
                    await send(self._chunk(record, offset))
                    offset += len(record.text)
                record = await anext(stream)
            self.done = record
            for chunk in self._last_chunks():
                await send(chunk)
        except ApiError as e:  # after the headers: the error goes in the stream
            await send(e.body())
            status = str(e.status)
        except ClientGone:
            return response, "client_gone"
        await send("[DONE]")
        await response.write_eof()
        return response, status

"""The bridge from the engine thread to a response: a job's records as they come, collected into
one JSON body or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time

import structlog
from aiohttp import web

from daemon.cluster.faults import RankLost
from daemon.engine.grammar import GrammarError
from daemon.engine.records import Delta, Finished
from daemon.server.keys import TOTALS
from daemon.server.openai_shapes import (
    ApiError,
    chat_chunk,
    chat_logprobs,
    chat_response,
    completion_chunk,
    completion_logprobs,
    completion_response,
    speculation_figures,
    token_origins,
    usage_chunk,
)
from daemon.server.prepare import Prepared
from daemon.server.worker import DeadlineExceeded, Job, QueueFull, Worker

POLL_SECONDS = 0.05  # how often a waiting handler checks that its client is still there
GRACE_SECONDS = 5.0  # past the deadline, how long a handler waits for the engine to say so itself
KEEPALIVE_SECONDS = 5.0  # a streaming request's SSE comment interval while nothing else is sent


class ClientGone(Exception):
    pass


def submit(worker: Worker, prepared: Prepared, timeout_s: float, model: str) -> tuple[Job, asyncio.Queue]:
    """Queues the request for the engine (for the model of that name); its records arrive on the
    returned queue."""
    loop = asyncio.get_running_loop()
    out: asyncio.Queue = asyncio.Queue()
    deadline = time.monotonic() + timeout_s
    job = Job(prepared.request, prepared.speculation, lambda r: loop.call_soon_threadsafe(out.put_nowait, r), deadline,
              model=model)
    hand_over(worker, job)
    return job, out


def hand_over(worker: Worker, job) -> None:
    """Queues a Job or a Wanted; a full queue or a lost rank is the client's 503."""
    try:
        worker.submit(job)
    except QueueFull:
        raise ApiError(503, "the server is busy: too many requests are waiting; retry shortly",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    except RankLost as e:
        raise rank_lost(e) from None


def rank_lost(e: RankLost) -> ApiError:
    return ApiError(503, str(e), code="rank_lost", headers={"Retry-After": "10"})


def _closing(http: web.Request) -> bool:
    return http.transport is None or http.transport.is_closing()


async def records(http: web.Request, job: Job, out: asyncio.Queue, heartbeat: float | None = None):
    """The job's records, as they come; raises ClientGone when the client leaves. With `heartbeat`,
    None every `heartbeat` seconds without a record."""
    quiet_since = time.monotonic()
    while True:
        try:
            record = await asyncio.wait_for(out.get(), POLL_SECONDS)
        except TimeoutError:
            if _closing(http):
                raise ClientGone from None
            if time.monotonic() > job.deadline + GRACE_SECONDS:
                raise ApiError(504, "the request timed out", code="timeout") from None
            if heartbeat is not None and time.monotonic() - quiet_since > heartbeat:
                quiet_since = time.monotonic()
                yield None
            continue
        if _closing(http):  # also while records keep coming (a fast model's): the engine is told at once
            raise ClientGone
        quiet_since = time.monotonic()
        if isinstance(record, DeadlineExceeded):
            raise ApiError(504, str(record), code="timeout")
        if isinstance(record, RankLost):
            raise rank_lost(record)
        if isinstance(record, GrammarError):
            raise ApiError(400, f"the answer's grammar could not go on: {record}", code="grammar_too_complex")
        if isinstance(record, Exception):
            raise record
        if isinstance(record, Delta):
            http.app[TOTALS].streamed(len(record.token_ids))
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
        self.text: list[str] = []  # the answer as the model wrote it
        self.calls = prepared.tool_calls
        self.origins = prepared.body.include_origins

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
        if not self.chat:
            return web.json_response(completion_response(self.head, "".join(self.text), self.done, logprobs,
                                                         self.extension()))
        text, calls = "".join(self.text), None
        if self.calls is not None:
            events = self.calls.feed(text) + self.calls.close(self.done.finish_reason == "length")
            text, calls = "".join(e for kind, e in events if kind == "text"), self.calls.calls or None
        return web.json_response(chat_response(self.head, text, self.done, logprobs, self.extension(), calls))

    def _chunks(self, record: Delta, offset: int) -> list[dict]:
        if not self.chat:
            logprobs = completion_logprobs(list(record.logprobs), self.text_of, offset) if self.wants_logprobs else None
            return [completion_chunk(self.head, record.text, logprobs=logprobs)]
        logprobs = chat_logprobs(list(record.logprobs), self.text_of) if self.wants_logprobs else None
        if self.calls is None:
            return [chat_chunk(self.head, {"content": record.text}, logprobs=logprobs)]
        return [self._event_chunk(e) for e in self.calls.feed(record.text)]

    def _marked(self, chunks: list[dict], record: Delta) -> list[dict]:
        """With include_origins, the step's last chunk (an empty one when its text is held back) says
        the step's tokens and where they came from."""
        if not chunks:
            chunks = [chat_chunk(self.head, {}) if self.chat else completion_chunk(self.head, "")]
        chunks[-1]["mtpd"] = token_origins(record)
        return chunks

    def _event_chunk(self, event: tuple) -> dict:
        """A content delta, or one whole call as `delta.tool_calls[index]`."""
        kind, value = event
        if kind == "text":
            return chat_chunk(self.head, {"content": value})
        return chat_chunk(self.head, {"tool_calls": [{"index": len(self.calls.calls) - 1, **value}]})

    def _last_chunks(self) -> list[dict]:
        finish = self.done.finish_reason
        if self.chat:
            chunks = [self._event_chunk(e) for e in self.calls.close(finish == "length")] if self.calls is not None else []
            if self.calls is not None and self.calls.calls and finish == "stop":
                finish = "tool_calls"
            chunks.append(chat_chunk(self.head, {}, finish_reason=finish))
        else:
            chunks = [completion_chunk(self.head, "", finish_reason=finish)]
        if self.prepared.body.include_usage:
            obj = "chat.completion.chunk" if self.chat else "text_completion"
            chunks.append(usage_chunk(self.head, obj, self.done, self.extension()))
        return chunks

    async def stream(self, http: web.Request, stream) -> tuple[web.StreamResponse, str]:
        """Server-sent events; returns the response and how it ended ("ok", "client_gone" or the
        status of an error sent in the stream).
        The headers go out at once, queued or not; until the first token an SSE comment every
        KEEPALIVE_SECONDS shows the client the request is alive (the stream yields None then)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(http)

        async def write(line: str) -> None:
            try:
                await response.write(line.encode())
            except ConnectionError:
                raise ClientGone from None

        async def send(payload: dict | str) -> None:
            await write(f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n")

        status, offset = "ok", 0
        try:
            if self.chat:
                await send(chat_chunk(self.head, {"role": "assistant", "content": ""}))
            while not isinstance(record := await anext(stream), Finished):
                if record is None:
                    await write(": keep-alive\n\n")
                    continue
                self.text.append(record.text)
                if record.text or record.logprobs or (self.origins and record.token_ids):
                    chunks = self._chunks(record, offset)
                    for chunk in self._marked(chunks, record) if self.origins else chunks:
                        await send(chunk)
                    offset += len(record.text)
            self.done = record
            for chunk in self._last_chunks():
                await send(chunk)
        except ApiError as e:  # after the headers: the error goes in the stream
            await send(e.body())
            status = str(e.status)
        except ClientGone:
            return response, "client_gone"
        except Exception:
            structlog.get_logger().exception("internal error", path=http.path)
            await send(ApiError(500, "internal server error").body())
            status = "500"
        await send("[DONE]")
        await response.write_eof()
        return response, status

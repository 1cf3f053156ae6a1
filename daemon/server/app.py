"""The HTTP server: OpenAI's API on aiohttp.

It never touches MLX: a request becomes a `Job` for the engine thread (daemon.server.worker), and the
records the engine yields come back through the event loop. Every error reaches the client as
OpenAI's error JSON; a 500 says nothing of the code.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from daemon.engine.records import Delta, Finished, Request
from daemon.engine.sampling import SamplingParams
from daemon.models.prompts import encode_chat, encode_text, system_prefix_length
from daemon.server.metrics import Metrics
from daemon.server.openai_shapes import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    chat_chunk,
    chat_logprobs,
    chat_response,
    completion_chunk,
    completion_logprobs,
    completion_response,
    parse,
    speculation_figures,
    usage_chunk,
)
from daemon.server.worker import DeadlineExceeded, Job, QueueFull, Worker
from daemon.settings import Settings
from policies.registry import check as check_policy

log = structlog.get_logger()
POLL_SECONDS = 0.05  # how often a waiting handler checks that its client is still there
SERVICE = web.AppKey("service", object)


class ClientGone(Exception):
    pass


@dataclass
class Prepared:
    """A validated API request, ready for the engine."""

    body: ChatRequest | CompletionRequest
    request: Request
    speculation: str
    kind: str  # "chat" | "completion"


class Service:
    def __init__(self, settings: Settings, worker: Worker, metrics: Metrics):
        self.settings = settings
        self.worker = worker
        self.metrics = metrics
        metrics.queue.set_function(lambda: worker.waiting)
        self.started = time.time()
        self.totals = {"requests": 0, "completion_tokens": 0, "drafted_tokens": 0, "accepted_tokens": 0}
        self.last_speculation: dict = {}

    @property
    def lm(self):
        return self.worker.lm

    @property
    def context_length(self) -> int:
        return int(self.lm.config.get("max_position_embeddings", 4096))

    def default_speculation(self) -> str:
        return self.settings.speculation if self.lm.drafter is not None else "off"

    # -- turning a body into an engine request --------------------------------------------------

    def prepare(self, body: ChatRequest | CompletionRequest) -> Prepared:
        if body.model and body.model.lower() != self.lm.name.lower():
            raise ApiError(404, f"the model {body.model!r} does not exist; this daemon serves {self.lm.name!r}",
                           "model", "model_not_found")
        tokenizer = self.lm.tokenizer
        persist = 0
        if isinstance(body, ChatRequest):
            kind = "chat"
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
            ids = encode_chat(tokenizer, messages)
            length = system_prefix_length(tokenizer, messages, ids)
            persist = length if length >= self.settings.prompt_cache_min_tokens else 0
        else:
            kind = "completion"
            prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
            if isinstance(prompt, str):
                ids = encode_text(tokenizer, prompt)
            else:
                vocab = self.lm.config["vocab_size"]
                if any(not 0 <= t < vocab for t in prompt):
                    raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
                ids = list(prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty", "messages" if kind == "chat" else "prompt")
        room = self.context_length - len(ids)
        if room < 1:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; this model's context is {self.context_length} tokens",
                "messages" if kind == "chat" else "prompt",
                "context_length_exceeded",
            )
        max_tokens = min(body.token_limit() or self.settings.default_max_tokens, room)
        speculation = body.speculation or self.default_speculation()
        try:
            check_policy(speculation)
        except ValueError as e:
            raise ApiError(400, f"speculation: {e}", "speculation") from None
        if speculation != "off" and self.lm.drafter is None:
            raise ApiError(400, "speculation: this model has no drafter; use 'off'", "speculation")
        sampling = SamplingParams(
            1.0 if body.temperature is None else body.temperature, body.top_p or 1.0, body.top_k or 0, body.seed
        )
        request = Request(tuple(ids), max_tokens, sampling, body.stops, body.logprob_count(), persist)
        return Prepared(body, request, speculation, kind)

    def text_of(self, token: int) -> str:
        return self.lm.tokenizer.decode([token])

    def record(self, done: Finished, speculation: str) -> None:
        self.totals["requests"] += 1
        self.totals["completion_tokens"] += done.completion_tokens
        self.totals["drafted_tokens"] += done.stats.drafted
        self.totals["accepted_tokens"] += done.stats.accepted
        self.last_speculation = {"policy": speculation, "drafted_steps": sum(1 for k in done.stats.draft_lengths if k)}


# -- the bridge from the engine thread ---------------------------------------------------------------


def _closing(http: web.Request) -> bool:
    return http.transport is None or http.transport.is_closing()


async def _records(http: web.Request, job: Job, out: asyncio.Queue, grace: float = 5.0):
    """The job's records, as they come; raises ClientGone when the client leaves."""
    while True:
        try:
            record = await asyncio.wait_for(out.get(), POLL_SECONDS)
        except TimeoutError:
            if _closing(http):
                raise ClientGone from None
            if time.monotonic() > job.deadline + grace:
                raise ApiError(504, "the request timed out", code="timeout") from None
            continue
        if isinstance(record, DeadlineExceeded):
            raise ApiError(504, str(record), code="timeout")
        if isinstance(record, Exception):
            raise record
        yield record
        if isinstance(record, Finished):
            return


def _submit(service: Service, prepared: Prepared) -> tuple[Job, asyncio.Queue]:
    loop = asyncio.get_running_loop()
    out: asyncio.Queue = asyncio.Queue()
    deadline = time.monotonic() + service.settings.request_timeout_s
    job = Job(prepared.request, prepared.speculation, lambda r: loop.call_soon_threadsafe(out.put_nowait, r), deadline)
    try:
        service.worker.submit(job)
    except QueueFull:
        raise ApiError(503, "the server is busy: too many requests are waiting; retry shortly",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    return job, out


def _log_request(service: Service, rid: str, prepared: Prepared, done: Finished | None, status: str, text: str = ""):
    fields = {"id": rid, "endpoint": prepared.kind, "status": status, "stream": prepared.body.stream,
              "speculation": prepared.speculation, "prompt_tokens": len(prepared.request.prompt_ids)}
    if done is not None:
        stats = done.stats
        fields.update(
            cached_tokens=done.cached_tokens, completion_tokens=done.completion_tokens,
            tokens_per_second=round(done.tokens_per_second, 2), ttft_s=round(done.ttft_seconds, 4),
            drafted=stats.drafted, accepted=stats.accepted,
            acceptance=None if stats.acceptance_rate is None else round(stats.acceptance_rate, 3),
            lookup_drafted=stats.lookup_drafted, lookup_accepted=stats.lookup_accepted,
            draft_lengths=dict(Counter(stats.draft_lengths)), finish_reason=done.finish_reason,
        )
    if service.settings.log_prompts:
        fields.update(prompt=service.lm.tokenizer.decode(list(prepared.request.prompt_ids)), answer=text)
    log.info("request", **fields)


# -- handlers ----------------------------------------------------------------------------------------


async def _complete(http: web.Request, model: type) -> web.StreamResponse:
    service: Service = http.app[SERVICE]
    body = parse(model, await http.read())
    prepared = await asyncio.get_running_loop().run_in_executor(None, service.prepare, body)
    rid = ("chatcmpl-" if prepared.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    head = (rid, int(time.time()), service.lm.name)
    job, out = _submit(service, prepared)
    done, status, text = None, "ok", []
    try:
        if body.stream:
            response, done, status = await _stream(http, service, prepared, head, job, out)
        else:
            response, done, text = await _collect(http, service, prepared, head, job, out)
        return response
    except ClientGone:
        status = "client_gone"
        raise
    except ApiError as e:
        status = str(e.status)
        raise
    finally:
        job.cancelled.set()  # no-op when the job has finished
        if done is not None:
            service.record(done, prepared.speculation)
        _log_request(service, rid, prepared, done, status, "".join(text))


def _extension(done: Finished, prepared: Prepared) -> dict:
    return speculation_figures(done, prepared.speculation)


async def _collect(http, service: Service, prepared: Prepared, head, job, out):
    text, entries = [], []
    async for record in _records(http, job, out):
        if isinstance(record, Delta):
            text.append(record.text)
            entries.extend(record.logprobs)
        else:
            done = record
    logprobs = None
    if prepared.request.logprobs is not None:
        shape = chat_logprobs if prepared.kind == "chat" else completion_logprobs
        logprobs = shape(entries, service.text_of)
    build = chat_response if prepared.kind == "chat" else completion_response
    return web.json_response(build(head, "".join(text), done, logprobs, _extension(done, prepared))), done, text


async def _stream(http, service: Service, prepared: Prepared, head, job, out):
    records = _records(http, job, out)
    first = await anext(records)  # errors before the first token still get a status code
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(http)

    async def send(payload: dict | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
        try:
            await response.write(f"data: {data}\n\n".encode())
        except ConnectionError:
            raise ClientGone from None

    chat = prepared.kind == "chat"
    wants_logprobs = prepared.request.logprobs is not None
    offset, done = 0, None
    if chat:
        await send(chat_chunk(head, {"role": "assistant", "content": ""}))

    async def chain():
        yield first
        async for r in records:
            yield r

    try:
        async for record in chain():
            if isinstance(record, Finished):
                done = record
                break
            if not record.text and not record.logprobs:
                continue
            if chat:
                logprobs = chat_logprobs(list(record.logprobs), service.text_of) if wants_logprobs else None
                await send(chat_chunk(head, {"content": record.text}, logprobs=logprobs))
            else:
                logprobs = completion_logprobs(list(record.logprobs), service.text_of, offset) if wants_logprobs else None
                offset += len(record.text)
                await send(completion_chunk(head, record.text, logprobs=logprobs))
        if chat:
            await send(chat_chunk(head, {}, finish_reason=done.finish_reason))
        else:
            await send(completion_chunk(head, "", finish_reason=done.finish_reason))
        if prepared.body.include_usage:
            obj = "chat.completion.chunk" if chat else "text_completion"
            await send(usage_chunk(head, obj, done, _extension(done, prepared)))
    except ApiError as e:  # after the headers: the error goes in the stream
        await send(e.body())
        status = str(e.status)
    except ClientGone:
        return response, done, "client_gone"
    else:
        status = "ok"
    await send("[DONE]")
    await response.write_eof()
    return response, done, status


async def chat_completions(http: web.Request) -> web.StreamResponse:
    return await _complete(http, ChatRequest)


async def completions(http: web.Request) -> web.StreamResponse:
    return await _complete(http, CompletionRequest)


def _model_card(service: Service) -> dict:
    return {"id": service.lm.name, "object": "model", "created": int(service.started), "owned_by": "mtpd",
            "mtpd": {"drafter": service.lm.drafter_name, "context_length": service.context_length}}


async def list_models(http: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(http.app[SERVICE])]})


async def get_model(http: web.Request) -> web.Response:
    service: Service = http.app[SERVICE]
    if http.match_info["model"].lower() != service.lm.name.lower():
        raise ApiError(404, f"the model {http.match_info['model']!r} does not exist", "model", "model_not_found")
    return web.json_response(_model_card(service))


async def health(http: web.Request) -> web.Response:
    service: Service = http.app[SERVICE]
    totals = service.totals
    return web.json_response({
        "status": "ok",
        "model": service.lm.name,
        "drafter": service.lm.drafter_name,
        "speculation": service.default_speculation(),
        "uptime_s": round(time.time() - service.started, 1),
        "requests_served": totals["requests"],
        "completion_tokens": totals["completion_tokens"],
        "acceptance_rate": round(totals["accepted_tokens"] / totals["drafted_tokens"], 4)
        if totals["drafted_tokens"] else None,
        "last_request_speculation": service.last_speculation or None,
        "queue": service.worker.waiting,
        "busy": service.worker.busy,
    })


async def metrics(http: web.Request) -> web.Response:
    registry = http.app[SERVICE].metrics.registry
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


# -- middleware and app --------------------------------------------------------------------------------


ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models",
          "/health": "health", "/metrics": "metrics"}


def _endpoint(path: str) -> str:
    return ROUTES.get(path) or ("models" if path.startswith("/v1/models/") else "other")


@web.middleware
async def measured(http: web.Request, handler):
    """Counts every request by endpoint and status; times generation requests."""
    m: Metrics = http.app[SERVICE].metrics
    endpoint = _endpoint(http.path)
    generating = endpoint in ("chat", "completions")
    start = time.perf_counter()
    if generating:
        m.in_flight.inc()
    response = None
    try:
        response = await handler(http)
        return response
    finally:
        status = str(response.status) if response is not None else "499"
        m.requests.labels(endpoint, status).inc()
        if generating:
            m.in_flight.dec()
            m.duration.labels(endpoint).observe(time.perf_counter() - start)


@web.middleware
async def errors(http: web.Request, handler):
    try:
        return await handler(http)
    except ApiError as e:
        return web.json_response(e.body(), status=e.status, headers=e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = "the request body is too large" if e.status == 413 else e.reason
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(e.status)
        return web.json_response(ApiError(e.status, message, code=code).body(), status=e.status)
    except ClientGone:
        return web.Response(status=499)
    except Exception:
        log.exception("internal error", path=http.path)
        return web.json_response(ApiError(500, "internal server error").body(), status=500)


def _auth(api_key: str):
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def auth(http: web.Request, handler):
        if http.path.startswith("/v1/"):
            given = http.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key")
        return await handler(http)

    return auth


def build_app(service: Service) -> web.Application:
    middlewares = [measured, errors]
    if service.settings.api_key is not None:
        middlewares.append(_auth(service.settings.api_key.get_secret_value()))
    app = web.Application(middlewares=middlewares, client_max_size=service.settings.max_body_bytes)
    app[SERVICE] = service
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(service: Service, app: web.Application) -> None:
    """Serves until SIGTERM / SIGINT, then stops accepting, lets in-flight requests finish within
    the shutdown timeout and returns."""
    settings = service.settings
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=settings.shutdown_timeout_s, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    port = runner.addresses[0][1]
    log.info("serving", url=f"http://{settings.host}:{port}/v1", model=service.lm.name, drafter=service.lm.drafter_name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: no new requests; waiting for in-flight ones", timeout_s=settings.shutdown_timeout_s)
    await runner.cleanup()
    log.info("stopped")

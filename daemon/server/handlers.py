"""The routes' handlers: thin, they validate, hand the work to the engine thread and shape replies.
Domain errors are ApiErrors, which the app's error middleware turns into OpenAI's error JSON."""

from __future__ import annotations

import asyncio
import datetime
import functools
import time
import uuid
from collections import Counter

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from daemon.engine.records import Finished
from daemon.models.registry import Entry
from daemon.server.anthropic_shapes import CountTokensRequest, MessagesRequest, message_id
from daemon.server.context_edits import apply_edits
from daemon.server.hints import UNUSED, report, unused, unused_betas
from daemon.server.keys import METRICS, RESPONSES, SETTINGS, TOTALS, WORKER
from daemon.server.messages import MessagesReply
from daemon.server.openai_shapes import ApiError, ChatRequest, CompletionRequest, parse
from daemon.server.openapi import openapi
from daemon.server.page import served_figures, setup_page
from daemon.server.prepare import MODEL_SUFFIXES, Prepared, prepare, prompt_ids
from daemon.server.responses import ResponsesReply
from daemon.server.responses_shapes import ResponsesRequest, response_id
from daemon.server.streaming import KEEPALIVE_SECONDS, ClientGone, Reply, records, submit
from daemon.server.which_model import pick, served_for

log = structlog.get_logger()


def _log_request(http: web.Request, rid: str, endpoint: str, prepared: Prepared, done: Finished | None, status: str,
                 text: str, served):
    fields = {"id": rid, "endpoint": endpoint, "model": served.name, "status": status, "stream": prepared.body.stream,
              "speculation": prepared.speculation, "prompt_tokens": len(prepared.request.prompt_ids)}
    if http.get(UNUSED):
        fields["unused_hints"] = http[UNUSED]
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
    if http.app[SETTINGS].log_prompts:
        fields.update(prompt=served.tokenizer.decode(list(prepared.request.prompt_ids)), answer=text)
    log.info("request", **fields)


async def _complete(http: web.Request, body: ChatRequest | CompletionRequest, rid: str, endpoint: str,
                    reply_type: type = Reply) -> web.StreamResponse:
    """Prepares `body`, runs it on the engine and answers in `reply_type`'s shape."""
    settings, worker = http.app[SETTINGS], http.app[WORKER]
    served = await served_for(http, body.model, settings.request_timeout_s)
    prepared = await asyncio.get_running_loop().run_in_executor(None, prepare, body, served, settings)
    if prepared.aliased:  # the name it asked for is answered by the model this daemon runs
        report(http, [*http.get(UNUSED, []), "model"])
    reply = reply_type(prepared, (rid, int(time.time()), served.name), lambda t: served.tokenizer.decode([t]))
    job, out = submit(worker, prepared, settings.request_timeout_s, served.name)
    status = "ok"
    try:
        if body.stream:
            response, status = await reply.stream(http, records(http, job, out, KEEPALIVE_SECONDS))
        else:
            response = await reply.collect(records(http, job, out))
        return response
    except ClientGone:
        status = "client_gone"
        raise
    except ApiError as e:
        status = str(e.status)
        raise
    finally:
        job.cancelled.set()  # no-op when the job has finished
        if reply.done is not None:
            http.app[TOTALS].add(reply.done, prepared.speculation)
        _log_request(http, rid, endpoint, prepared, reply.done, status, "".join(reply.text), served)


async def chat_completions(http: web.Request) -> web.StreamResponse:
    body = parse(ChatRequest, await http.read())
    report(http, unused(body))
    return await _complete(http, body, "chatcmpl-" + uuid.uuid4().hex[:24], "chat")


async def completions(http: web.Request) -> web.StreamResponse:
    body = parse(CompletionRequest, await http.read())
    report(http, unused(body))
    return await _complete(http, body, "cmpl-" + uuid.uuid4().hex[:24], "completions")


async def _anthropic(http: web.Request, model: type[CountTokensRequest]) -> tuple[CountTokensRequest, dict | None]:
    """The request body with its hints reported and its context edits applied, and what they did
    ({"applied_edits": [...]}, None when it asked for none)."""
    body = parse(model, await http.read())
    report(http, unused(body) + unused_betas(http))
    if body.context_management is None:
        return body, None
    settings = http.app[SETTINGS]
    served = await served_for(http, body.model, settings.request_timeout_s)

    def count(messages: list) -> int:
        return len(prompt_ids(body.model_copy(update={"messages": messages}).as_chat(), served, settings))

    return await asyncio.get_running_loop().run_in_executor(None, apply_edits, body, count)


async def messages(http: web.Request) -> web.StreamResponse:
    """Anthropic's Messages API, served by the same chat path."""
    body, applied = await _anthropic(http, MessagesRequest)
    reply = functools.partial(MessagesReply, context_management=applied)
    return await _complete(http, body.chat(), message_id(), "messages", reply)


async def responses(http: web.Request) -> web.StreamResponse:
    """OpenAI's Responses API, served by the same chat path; a `previous_response_id` continues
    from a kept response's conversation."""
    body = parse(ResponsesRequest, await http.read())
    report(http, unused(body))
    store = http.app[RESPONSES]
    history = store.get(body.previous_response_id) if body.previous_response_id is not None else []
    chat = body.as_chat(history)
    reply = functools.partial(ResponsesReply, body=body, conversation=history + body.items(),
                              store=store if body.store else None)
    return await _complete(http, chat, response_id(), "responses", reply)


async def count_tokens(http: web.Request) -> web.Response:
    """The prompt's tokens after its context edits, as Anthropic counts them."""
    body, _ = await _anthropic(http, CountTokensRequest)
    served = await served_for(http, body.model, http.app[SETTINGS].request_timeout_s)
    ids = await asyncio.get_running_loop().run_in_executor(None, prompt_ids, body.as_chat(), served, http.app[SETTINGS])
    return web.json_response({"input_tokens": len(ids)})


def _model_card(app: web.Application, entry: Entry, suffix: str | None = None) -> dict:
    """A model the daemon serves, loaded or not; with `suffix`, the same model under a draft policy
    (`<model>:off`)."""
    worker = app[WORKER]
    served = worker.known.get(entry.name)
    about = {"drafter": served.drafter, "context_length": served.context_length} if served is not None else {}
    return {"id": entry.name + (f":{suffix}" if suffix else ""), "object": "model",
            "created": int(app[TOTALS].started), "owned_by": "mtpd",
            "mtpd": {**about, "speculation": suffix, "loaded": entry.name in worker.loaded, "source": entry.source}}


def _suffixes(app: web.Application) -> tuple[str, ...]:
    return MODEL_SUFFIXES if app[WORKER].served.drafter is not None else ("off",)


def _anthropic_card(card: dict) -> dict:
    created = datetime.datetime.fromtimestamp(card["created"], datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"type": "model", "id": card["id"], "display_name": card["id"], "created_at": created}


async def list_models(http: web.Request) -> web.Response:
    """Every model of the registry; the default also under each draft policy. In Anthropic's
    shape for a client that sends `anthropic-version` (Anthropic's SDK, Claude Code)."""
    models = list(http.app[WORKER].models.values())
    cards = [_model_card(http.app, models[0])] + [_model_card(http.app, models[0], s) for s in _suffixes(http.app)]
    cards += [_model_card(http.app, e) for e in models[1:]]
    if "anthropic-version" in http.headers:
        listed = [_anthropic_card(c) for c in cards]
        return web.json_response({"data": listed, "has_more": False, "first_id": listed[0]["id"],
                                  "last_id": listed[-1]["id"]})
    return web.json_response({"object": "list", "data": cards})


async def get_model(http: web.Request) -> web.Response:
    asked, models = http.match_info["model"], http.app[WORKER].models
    entry = pick(models, asked)
    suffix = asked[len(entry.name) + 1:] or None
    named = asked.lower() == entry.name.lower() or entry is next(iter(models.values())) and suffix in _suffixes(http.app)
    if not named or asked[: len(entry.name)].lower() != entry.name.lower():
        raise ApiError(404, f"the model {asked!r} does not exist", "model", "model_not_found")
    card = _model_card(http.app, entry, suffix)
    return web.json_response(_anthropic_card(card) if "anthropic-version" in http.headers else card)


async def health(http: web.Request) -> web.Response:
    worker, totals = http.app[WORKER], http.app[TOTALS]
    return web.json_response({
        "status": "ok" if worker.lost is None else "rank lost",
        **({"error": str(worker.lost)} if worker.lost is not None else {}),
        **({"placement": worker.served.placement} if worker.served.placement else {}),
        **({"speed_paths": worker.served.speed_paths} if worker.served.speed_paths else {}),
        **served_figures(http.app),
        "acceptance_rate": totals.acceptance_rate,
        "last_request_speculation": totals.last_speculation,
        "busy": worker.busy,
        "loaded_models": [{"name": name, "bytes": n} for name, n in worker.loaded.items()],
        "loading": worker.loading,
    }, status=200 if worker.lost is None else 503)


async def metrics(http: web.Request) -> web.Response:
    return web.Response(body=generate_latest(http.app[METRICS].registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    setup_page(app)

"""The HTTP server: OpenAI's APIs (chat completions, completions, responses) and Anthropic's
Messages API on aiohttp, in aiohttp's own shape (an app factory, typed keys, the engine worker
opened and closed in `cleanup_ctx`, thin handlers, one error middleware).

It never touches MLX: a request becomes a `Job` for the engine thread (daemon.server.worker), and
the records the engine yields come back through the event loop. Every error reaches the client as
its API's error JSON; a 500 says nothing of the code.
"""

from __future__ import annotations

import asyncio
import hmac
import signal
import time

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from daemon.cluster.faults import RankLost
from daemon.server.handlers import setup_routes
from daemon.server.hints import add_header
from daemon.server.keys import METRICS, MODEL, RESPONSES, SETTINGS, TOTALS, WORKER, Totals
from daemon.server.metrics import Metrics
from daemon.server.openai_shapes import ApiError
from daemon.server.protocol import Runner, error_response, more_sockets, said
from daemon.server.response_store import ResponseStore
from daemon.server.security import cors, cors_headers, guarded
from daemon.server.streaming import ClientGone
from daemon.server.worker import Worker
from daemon.settings import Settings

log = structlog.get_logger()
ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/messages": "messages",
          "/v1/messages/count_tokens": "count_tokens", "/v1/responses": "responses", "/v1/models": "models", "/health": "health",
          "/metrics": "metrics", "/mtpd/status": "status", "/": "page"}


def _endpoint(path: str) -> str:
    if path in ROUTES:
        return ROUTES[path]
    return "models" if path.startswith("/v1/models/") else "page" if path.startswith("/page/") else "other"


@web.middleware
async def measured(http: web.Request, handler):
    """Counts every request by endpoint and status; times generation requests."""
    m: Metrics = http.app[METRICS]
    endpoint = _endpoint(http.path)
    generating = endpoint in ("chat", "completions", "messages", "responses")
    start = time.perf_counter()
    if generating:
        m.in_flight.inc()
    response = None
    try:
        response = await handler(http)
        return response
    finally:
        status = str(response.status) if response is not None else "499"
        model = http.get(MODEL, "")
        m.requests.labels(endpoint, status, model).inc()
        if generating:
            m.in_flight.dec()
            m.duration.labels(endpoint, model).observe(time.perf_counter() - start)


def _error(http: web.Request, e: ApiError) -> web.Response:
    return error_response(http.path, e)


@web.middleware
async def errors(http: web.Request, handler):
    try:
        return await handler(http)
    except ApiError as e:
        return _error(http, e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = "the request body is too large" if e.status == 413 else e.reason
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(e.status)
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None  # a 405 must say what is allowed
        return _error(http, ApiError(e.status, message, code=code, headers=allow))
    except HttpProcessingError as e:  # the body as it was read: broken chunking, a bad length
        return _error(http, ApiError(400, said(e), code="bad_request"))
    except (ClientGone, ConnectionError):  # the client left, while its body was read or its answer written
        return web.Response(status=499)
    except Exception:
        log.exception("internal error", path=http.path)
        return _error(http, ApiError(500, "internal server error"))


def _auth(api_key: str):
    """OpenAI's clients send `Authorization: Bearer KEY`, Anthropic's `x-api-key: KEY`: either will do."""
    bearer, key = f"Bearer {api_key}".encode(), api_key.encode()

    @web.middleware
    async def auth(http: web.Request, handler):
        if guarded(http.path):
            given = http.headers.get("Authorization", "").encode()
            if not (hmac.compare_digest(given, bearer) or hmac.compare_digest(http.headers.get("x-api-key", "").encode(), key)):
                raise ApiError(401, "invalid or missing API key (Authorization: Bearer ... or x-api-key)",
                               code="invalid_api_key")
        return await handler(http)

    return auth


async def _engine(app: web.Application):
    """Loads the model on the engine thread before the port opens; stops it after the last request."""
    worker, loop = app[WORKER], asyncio.get_running_loop()
    await loop.run_in_executor(None, worker.start)
    app[METRICS].queue.set_function(lambda: worker.waiting)
    yield
    await loop.run_in_executor(None, worker.stop, app[SETTINGS].shutdown_timeout_s)


def init_app(settings: Settings, worker: Worker, metrics: Metrics) -> web.Application:
    middlewares = [measured, errors, cors(settings.allowed_origins)]  # a refused origin never reaches auth
    if settings.api_key is not None:
        middlewares.append(_auth(settings.api_key.get_secret_value()))
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app[SETTINGS], app[WORKER], app[METRICS], app[TOTALS] = settings, worker, metrics, Totals()
    app[RESPONSES] = ResponseStore()
    app.on_response_prepare.append(cors_headers(settings.allowed_origins))
    app.on_response_prepare.append(add_header)  # the hints a request left unused (daemon.server.hints)
    app.cleanup_ctx.append(_engine)
    setup_routes(app)
    return app


async def serve(app: web.Application) -> RankLost | None:
    """Serves until SIGTERM / SIGINT, or until a rank of the cluster is lost, then stops accepting,
    lets in-flight requests finish within the shutdown timeout and returns the loss, if any."""
    settings = app[SETTINGS]
    open_files = more_sockets()
    runner = Runner(app, handle_signals=False, shutdown_timeout=settings.shutdown_timeout_s, access_log=None,
                    keepalive_timeout=settings.idle_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    served = app[WORKER].served
    log.info("serving", url=f"http://{settings.host}:{runner.addresses[0][1]}/v1", model=served.name, drafter=served.drafter,
             open_files=open_files)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app[WORKER].on_lost = lambda lost: loop.call_soon_threadsafe(stop.set)
    if app[WORKER].lost is not None:  # lost while the port opened
        stop.set()
    await stop.wait()
    log.info("stopping: no new requests; waiting for in-flight ones", timeout_s=settings.shutdown_timeout_s)
    await runner.cleanup()
    log.info("stopped")
    return app[WORKER].lost

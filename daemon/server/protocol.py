"""HTTP protocol errors in the API's JSON error shape.

aiohttp answers a request it cannot parse (a request line or header past 8,190 bytes, an unknown
method, broken chunking) itself, in plain text, before any middleware runs, and logs a traceback.
The server's runner gives it a request handler that answers those in JSON, in the shape of the API
the path belongs to, and logs one line. Connections idle past `idle_timeout_s` (aiohttp's default:
an hour) are closed, and the limit on open files is raised, so idle sockets cannot use them all up.
"""

from __future__ import annotations

import contextlib
import resource

import structlog
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from daemon.server.anthropic_shapes import error_body
from daemon.server.openai_shapes import ApiError

log = structlog.get_logger()
OPEN_FILES = 10_240  # macOS's OPEN_MAX
SAID = {  # what each of aiohttp's parse errors means, in a client's terms
    http_exceptions.LineTooLong: "the request line or a header is too long",
    http_exceptions.BadHttpMethod: "not an HTTP method mtpd knows",
    http_exceptions.BadStatusLine: "a malformed HTTP request line",
    http_exceptions.InvalidHeader: "a malformed HTTP header",
    http_exceptions.InvalidURLError: "a malformed URL",
    http_exceptions.PayloadEncodingError: "a malformed request body encoding (chunking, length or compression)",
}


def said(exc: BaseException | None) -> str:
    return next((text for kind, text in SAID.items() if isinstance(exc, kind)), "a malformed HTTP request")


def error_response(path: str, e: ApiError) -> web.Response:
    """`e` in the shape of the API the path belongs to: Anthropic's under /v1/messages, else OpenAI's."""
    body = error_body(e) if path.startswith("/v1/messages") else e.body()
    return web.json_response(body, status=e.status, headers=e.headers)


class JsonErrors(RequestHandler):
    def handle_error(self, request, status: int = 500, exc: BaseException | None = None, message: str | None = None):
        log.info("bad request", status=status, error=said(exc), remote=request.remote)
        if request.writer.output_size > 0:  # as aiohttp's own: too late for another response
            raise ConnectionError("the response has started; the error cannot be sent")
        code = "bad_request" if status < 500 else None
        response = error_response(request.path, ApiError(status, said(exc) if status < 500 else "internal server error",
                                                         code=code))
        response.force_close()
        return response


class _Server(Server):
    def __call__(self) -> RequestHandler:
        return JsonErrors(self, loop=self._loop, **self._kwargs)


def more_sockets() -> int:
    """Raises the soft limit on open files to the hard one (macOS's launchd starts services at 256;
    each connection is a file), at most OPEN_FILES. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):  # macOS refuses past its kernel's own limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Runner(web.AppRunner):
    """aiohttp's AppRunner, its connections handled by JsonErrors."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _Server  # built by the app as aiohttp builds it; only the handler differs
        return server

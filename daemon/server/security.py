"""The cross-origin policy, as Ollama's: a browser page may call the daemon only from an allowed origin.

A page on any site can send a "simple" cross-origin POST (a text/plain body, no preflight) to
127.0.0.1, and a DNS-rebinding page sends its POSTs as its own origin: browsers put an `Origin`
header on both. A request whose `Origin` is not in `allowed_origins` is refused (403) before any
handler runs; an allowed one gets the CORS headers, and its preflight `OPTIONS` is answered here.
Requests without `Origin` (curl, the SDKs, Prometheus) are not affected.
"""

from __future__ import annotations

from aiohttp import web

from daemon.server.hints import HEADER as HINTS_HEADER
from daemon.server.openai_shapes import ApiError

EXPOSED = f"{HINTS_HEADER}, Retry-After"  # a hint the model could not act on; when to try again

METHODS = "GET, POST, OPTIONS"
GUARDED = ("/v1/", "/mtpd/")  # what an API key guards: the APIs and the page's data (the page itself holds none)
PREFLIGHT_MAX_AGE_S = "600"


def guarded(path: str) -> bool:
    return path.startswith(GUARDED)


def origin_allowed(origin: str, allowed: list[str]) -> bool:
    """`allowed` entries: an exact origin (`https://app.example`), one whose port is `*` (any port,
    or none: `http://localhost:*`), or `*` (every origin)."""
    origin = origin.lower()
    for entry in (e.lower().rstrip("/") for e in allowed):
        if entry in ("*", origin):
            return True
        if entry.endswith(":*"):
            base = entry[:-2]
            port = origin[len(base) + 1:] if origin.startswith(base + ":") else None
            if origin == base or (port is not None and port.isdigit()):
                return True
    return False


def cors(allowed: list[str]):
    """The middleware: refuses other origins before auth and the handlers; answers allowed preflights."""

    @web.middleware
    async def cross_origin(http: web.Request, handler):
        origin = http.headers.get("Origin")
        if origin is None:
            return await handler(http)
        if not origin_allowed(origin, allowed):
            raise ApiError(403, f"origin {origin} is not allowed (the allowed_origins setting)",
                           code="origin_not_allowed")
        if http.method == "OPTIONS" and "Access-Control-Request-Method" in http.headers:
            return web.Response(status=204, headers={
                "Access-Control-Allow-Methods": METHODS, "Access-Control-Max-Age": PREFLIGHT_MAX_AGE_S,
                "Access-Control-Allow-Headers": http.headers.get("Access-Control-Request-Headers", ""),
            })
        return await handler(http)

    return cross_origin


def cors_headers(allowed: list[str]):
    """An `on_response_prepare` signal: every response to an allowed origin names it, streams
    included (their headers go out inside the handler, after the middleware could add any), and
    lets the page read the headers of ours it may want (EXPOSED)."""

    async def mark(http: web.Request, response: web.StreamResponse) -> None:
        origin = http.headers.get("Origin")
        if origin is not None and origin_allowed(origin, allowed):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSED
            response.headers["Vary"] = "Origin"

    return mark

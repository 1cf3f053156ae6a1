"""The daemon's own page: GET / and /page/* serve static files shipped in the package (no build
step, no CDN, works offline); GET /mtpd/status is its data, which an API key guards like the APIs
(the page asks for the key; the files themselves hold nothing)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from aiohttp import web

from daemon.engine.memory import resident_bytes
from daemon.engine.records import SpecStats
from daemon.server.keys import SETTINGS, TOTALS, WORKER
from daemon.server.prepare import default_speculation

STATIC = Path(__file__).parent / "static"
FILES = {p.name: p for p in STATIC.iterdir() if p.is_file()}  # by name only: no path reaches another file


async def index(http: web.Request) -> web.FileResponse:
    return web.FileResponse(FILES["index.html"])


async def page_file(http: web.Request) -> web.FileResponse:
    path = FILES.get(http.match_info["name"])
    if path is None:
        raise web.HTTPNotFound()
    return web.FileResponse(path)


def acceptance(stats: SpecStats) -> dict:
    """Drafts and accepted drafts by draft position, and by content class and source."""
    by_class: dict[str, dict] = {}
    for (klass, source), (_, drafted, accepted) in stats.by_kind.items():
        by_class.setdefault(klass, {})[source] = {"drafted": drafted, "accepted": accepted}
    positions = zip(stats.drafted_by_position, stats.accepted_by_position)
    return {"by_position": [{"drafted": d, "accepted": a} for d, a in positions], "by_class": by_class}


def served_figures(app: web.Application) -> dict:
    """What /health and /mtpd/status both say: the model, the load, the totals since start-up, memory."""
    worker, totals = app[WORKER], app[TOTALS]
    return {
        "model": worker.served.name,
        "drafter": worker.served.drafter,
        "speculation": default_speculation(worker.served, app[SETTINGS]),
        "uptime_s": round(time.time() - totals.started, 1),
        "requests_served": totals.requests,
        "completion_tokens": totals.completion_tokens,
        "running": worker.running,
        "waiting": worker.waiting,
        "memory": {"rss_bytes": resident_bytes(), **dataclasses.asdict(worker.memory)},
    }


async def status(http: web.Request) -> web.Response:
    worker, totals = http.app[WORKER], http.app[TOTALS]
    costs = worker.costs()
    return web.json_response({
        **served_figures(http.app),
        "drafter_kind": worker.served.drafter_kind,
        "tokens_per_second": round(totals.tokens_per_second(), 2),
        "acceptance": acceptance(totals.stats),
        "costs": costs,
        "off_tokens_per_second": round(1e3 / costs["round_ms"][0], 2) if costs and costs["round_ms"][0] > 0 else None,
        "last_request": totals.last_speculation,
    })


def setup_page(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/page/{name}", page_file)
    app.router.add_get("/mtpd/status", status)

"""Which loaded-or-not model a request's `model` names, and its ServedModel (tokenizer, limits)
once it has one: a model never loaded is loaded first, on the engine thread, while the request
waits (counted in /health's `loading`)."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from daemon.cluster.faults import RankLost
from daemon.models.registry import Entry
from daemon.server.keys import MODEL, WORKER
from daemon.server.openai_shapes import ApiError
from daemon.server.streaming import hand_over, rank_lost
from daemon.server.worker import DeadlineExceeded, ServedModel, Wanted


def pick(models: dict[str, Entry], name: str | None) -> Entry:
    """The entry `name` (any case, `NAME` or `NAME:POLICY`) names; else the first, the default:
    an empty name, an alias (model_aliases) or an unknown one, which `prepare` then refuses."""
    wanted = (name or "").lower()
    for entry in sorted(models.values(), key=lambda e: -len(e.name)):  # the longest name first: `a:b` beside `a`
        if wanted == entry.name.lower() or wanted.startswith(entry.name.lower() + ":"):
            return entry
    return next(iter(models.values()))


async def served_for(http: web.Request, name: str | None, timeout_s: float) -> ServedModel:
    worker = http.app[WORKER]
    entry = pick(worker.models, name)
    http[MODEL] = entry.name
    served = worker.known.get(entry.name)
    if served is not None:
        return served
    loop = asyncio.get_running_loop()
    answer: asyncio.Future = loop.create_future()

    def settle(result) -> None:
        if not answer.done():
            (answer.set_exception if isinstance(result, BaseException) else answer.set_result)(result)

    wanted = Wanted(entry.name, lambda r: loop.call_soon_threadsafe(settle, r), time.monotonic() + timeout_s)
    hand_over(worker, wanted)
    worker.loading += 1
    try:
        return await answer
    except DeadlineExceeded:
        raise ApiError(504, f"the model {entry.name!r} did not load in time", code="timeout") from None
    except RankLost as e:
        raise rank_lost(e) from None
    finally:
        worker.loading -= 1
        wanted.cancelled.set()

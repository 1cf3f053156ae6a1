"""What the aiohttp app holds, under typed keys, and the running totals `/health` reports."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from aiohttp import web

from daemon.engine.records import Finished, SpecStats
from daemon.server.metrics import Metrics
from daemon.server.response_store import ResponseStore
from daemon.server.worker import Worker
from daemon.settings import Settings

RATE_WINDOW_S = 5.0  # the live tokens/s: tokens streamed over the last this many seconds


@dataclass
class Totals:
    """Since start-up: requests served and what speculation did, read from each Finished record;
    and the tokens streamed lately, for a live rate."""

    started: float = field(default_factory=time.time)
    requests: int = 0
    completion_tokens: int = 0
    stats: SpecStats = field(default_factory=SpecStats)  # every request's drafts, merged
    last_speculation: dict | None = None  # the last request's policy and what its drafts did
    recent: deque = field(default_factory=deque)  # (time.monotonic(), tokens) of each streamed step

    def add(self, done: Finished, policy: str) -> None:
        stats = done.stats
        self.requests += 1
        self.completion_tokens += done.completion_tokens
        self.stats.merge(stats)
        self.last_speculation = {"policy": policy, "drafted_steps": sum(1 for k in stats.draft_lengths if k),
                                 "completion_tokens": done.completion_tokens, "drafted": stats.drafted,
                                 "accepted": stats.accepted}

    def streamed(self, tokens: int, now: float | None = None) -> None:
        self.recent.append((self._forget(now), tokens))

    def tokens_per_second(self, now: float | None = None) -> float:
        """Tokens streamed (every request together) over the last RATE_WINDOW_S seconds, per second."""
        self._forget(now)
        return sum(n for _, n in self.recent) / RATE_WINDOW_S

    def _forget(self, now: float | None) -> float:
        """Drops what is older than the window; returns `now`."""
        now = time.monotonic() if now is None else now
        while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
            self.recent.popleft()
        return now

    @property
    def acceptance_rate(self) -> float | None:
        rate = self.stats.acceptance_rate
        return None if rate is None else round(rate, 4)


SETTINGS = web.AppKey("settings", Settings)
WORKER = web.AppKey("worker", Worker)
METRICS = web.AppKey("metrics", Metrics)
TOTALS = web.AppKey("totals", Totals)
RESPONSES = web.AppKey("responses", ResponseStore)  # kept for previous_response_id
MODEL = web.RequestKey("model", str)  # the model a request went to (for its metrics)

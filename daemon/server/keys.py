"""What the aiohttp app holds, under typed keys, and the running totals `/health` reports."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from daemon.engine.records import Finished
from daemon.server.metrics import Metrics
from daemon.server.response_store import ResponseStore
from daemon.server.worker import Worker
from daemon.settings import Settings


@dataclass
class Totals:
    """Since start-up: requests served and what speculation did, read from each Finished record."""

    started: float = field(default_factory=time.time)
    requests: int = 0
    completion_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    last_speculation: dict | None = None  # the last request's policy and how many steps drafted

    def add(self, done: Finished, policy: str) -> None:
        self.requests += 1
        self.completion_tokens += done.completion_tokens
        self.drafted += done.stats.drafted
        self.accepted += done.stats.accepted
        self.last_speculation = {"policy": policy, "drafted_steps": sum(1 for k in done.stats.draft_lengths if k)}

    @property
    def acceptance_rate(self) -> float | None:
        return round(self.accepted / self.drafted, 4) if self.drafted else None


SETTINGS = web.AppKey("settings", Settings)
WORKER = web.AppKey("worker", Worker)
METRICS = web.AppKey("metrics", Metrics)
TOTALS = web.AppKey("totals", Totals)
RESPONSES = web.AppKey("responses", ResponseStore)  # kept for previous_response_id

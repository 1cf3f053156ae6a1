"""What the aiohttp app holds, under typed keys, and the running totals `/health` reports."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from aiohttp import web

from daemon.engine.records import Finished
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
    drafted: int = 0
    accepted: int = 0
    last_speculation: dict | None = None  # the last request's policy and what its drafts did
    by_position: list[list[int]] = field(default_factory=list)  # [j]: [drafted, accepted] at draft position j + 1
    by_kind: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # class -> source -> [drafted, accepted]
    recent: deque = field(default_factory=deque)  # (time.monotonic(), tokens) of each streamed step

    def add(self, done: Finished, policy: str) -> None:
        stats = done.stats
        self.requests += 1
        self.completion_tokens += done.completion_tokens
        self.drafted += stats.drafted
        self.accepted += stats.accepted
        self.last_speculation = {"policy": policy, "drafted_steps": sum(1 for k in stats.draft_lengths if k),
                                 "completion_tokens": done.completion_tokens, "drafted": stats.drafted,
                                 "accepted": stats.accepted}
        self.by_position.extend([0, 0] for _ in range(len(stats.drafted_by_position) - len(self.by_position)))
        for j, pair in enumerate(zip(stats.drafted_by_position, stats.accepted_by_position)):
            self.by_position[j] = [a + b for a, b in zip(self.by_position[j], pair)]
        for (klass, source), (_, drafted, accepted) in stats.by_kind.items():
            counts = self.by_kind.setdefault(klass, {}).setdefault(source, [0, 0])
            counts[0] += drafted
            counts[1] += accepted

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
        return round(self.accepted / self.drafted, 4) if self.drafted else None


SETTINGS = web.AppKey("settings", Settings)
WORKER = web.AppKey("worker", Worker)
METRICS = web.AppKey("metrics", Metrics)
TOTALS = web.AppKey("totals", Totals)
RESPONSES = web.AppKey("responses", ResponseStore)  # kept for previous_response_id

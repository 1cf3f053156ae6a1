"""Prometheus metrics (prometheus-client), all prefixed `mtpd_`.

Labels are bounded: endpoint (a fixed route list), HTTP status code, model (the registry's names;
"" for requests that name none), content class (code / prose),
draft position (1..16), draft source (mtp / lookup), step kind. No request ids or text. Engine
figures are recorded on the engine thread after each request from the `Finished` record and the
policy's step log, and after every batched forward (its sequences and rows); HTTP figures in the
server's middleware.
"""

from __future__ import annotations

import platform

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)

from daemon.engine.memory import Memory, resident_bytes
from daemon.engine.records import SOURCES, Finished
from policies.classifier import CLASSES
from policies.registry import MAX_DRAFT

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)

disable_created_metrics()  # no `_created` series: half the exposition, no use on a dashboard


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mtpd_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status", "model"], registry=r)
        self.duration = Histogram("mtpd_request_duration_seconds", "HTTP request duration (generation requests)",
                                  ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("mtpd_time_to_first_token_seconds", "time from the request to its first token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mtpd_inter_token_latency_seconds", "mean time between tokens of a request",
                             ["model"], buckets=TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("mtpd_prompt_tokens", "prompt tokens", ["model"], registry=r)
        self.completion_tokens = Counter("mtpd_completion_tokens", "generated tokens", ["model"], registry=r)
        self.cached_tokens = Counter("mtpd_cached_prompt_tokens", "prompt tokens taken from the prompt cache", ["model"],
                                     registry=r)
        self.cache_lookups = Counter("mtpd_prompt_cache_lookups", "prompt cache lookups by result (hit / miss)",
                                     ["result", "model"], registry=r)
        self.cache_bytes = Gauge("mtpd_prompt_cache_bytes", "bytes held by the prompt cache", ["tier"], registry=r)
        self.drafts = Counter("mtpd_speculative_steps", "verification steps with k >= 1 drafted tokens",
                              ["content_class", "source", "model"], registry=r)
        self.draft_tokens = Counter("mtpd_draft_tokens", "drafted tokens", ["content_class", "source", "model"], registry=r)
        self.accepted_tokens = Counter("mtpd_accepted_tokens", "drafted tokens the target accepted",
                                       ["content_class", "source", "model"], registry=r)
        self.drafted_at = Counter("mtpd_draft_tokens_by_position", "drafted tokens by draft position",
                                  ["position", "model"], registry=r)
        self.accepted_at = Counter("mtpd_accepted_tokens_by_position", "accepted tokens by draft position",
                                   ["position", "model"], registry=r)
        self.draft_length = Histogram("mtpd_draft_length", "draft length chosen per step (0: plain step)",
                                      ["model"], buckets=tuple(range(MAX_DRAFT + 1)), registry=r)
        self.speculation_active = Gauge("mtpd_speculation_active",
                                        "1 when the last step of the last request drafted, else 0", registry=r)
        self.speedup_expected = Gauge("mtpd_speedup_expected_ratio",
                                      "speed-up the cost model expected of the last request's speculative steps",
                                      registry=r)
        self.speedup_realised = Gauge("mtpd_speedup_realised_ratio",
                                      "measured tokens/s of the last request's speculative steps over plain tokens/s",
                                      registry=r)
        self.step_seconds = Histogram("mtpd_step_seconds", "decoding step time by kind (plain / speculative)",
                                      ["kind", "model"], buckets=TOKEN_BUCKETS, registry=r)
        self.cost_step = Gauge("mtpd_cost_model_step_seconds",
                               "cost model: predicted time of a step drafting k tokens and verifying k+1",
                               ["draft_length"], registry=r)
        self.queue = Gauge("mtpd_queue_length", "requests waiting for the engine", registry=r)
        self.running = Gauge("mtpd_running_sequences", "requests decoding together in the batch", registry=r)
        self.queue_wait = Histogram("mtpd_queue_wait_seconds", "time a request waited before the batch admitted it",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("mtpd_batch_sequences", "sequences in one batched target forward",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_rows = Histogram("mtpd_batch_rows", "rows in one batched target forward (tokens and drafts)",
                                    buckets=ROW_BUCKETS, registry=r)
        self.batch_drafts = Counter("mtpd_batch_draft_rows", "draft rows verified in batched target forwards",
                                    registry=r)
        self.in_flight = Gauge("mtpd_requests_in_flight", "generation requests being served or waiting", registry=r)
        self.info = Info("mtpd_model", "the served model and drafter", registry=r)
        self.memory = Gauge("mtpd_mlx_memory_bytes", "MLX memory by kind (active, peak, cache)", ["kind"], registry=r)
        Gauge("mtpd_resident_memory_bytes", "the process's resident set (RSS), MLX's memory and the rest",
              registry=r).set_function(resident_bytes)
        self.model_bytes = Gauge("mtpd_model_bytes", "bytes of each loaded model's weights (0: not loaded)",
                                 ["model"], registry=r)
        self.loads = Counter("mtpd_model_loads", "models loaded", ["model"], registry=r)
        self.load_seconds = Histogram("mtpd_model_load_seconds", "time to load a model", ["model"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.unloads = Counter("mtpd_model_unloads", "models unloaded, by reason (keep_alive / memory)",
                               ["model", "reason"], registry=r)

    def describe_model(self, lm, backend: str) -> None:
        """The default model."""
        self.info.info({"model": lm.name, "drafter": lm.drafter_name or "none", "backend": backend,
                        "machine": platform.machine()})

    def observe_load(self, model: str, seconds: float, nbytes: int) -> None:
        """A model loaded: its counters exist (at 0) before its first request."""
        self.loads.labels(model).inc()
        self.load_seconds.labels(model).observe(seconds)
        self.model_bytes.labels(model).set(nbytes)
        for reason in ("keep_alive", "memory"):
            self.unloads.labels(model, reason)
        for counter in (self.prompt_tokens, self.completion_tokens, self.cached_tokens):
            counter.labels(model)
        for klass in CLASSES:
            for source in SOURCES:
                for metric in (self.drafts, self.draft_tokens, self.accepted_tokens):
                    metric.labels(klass, source, model)
        for result in ("hit", "miss"):
            self.cache_lookups.labels(result, model)

    def observe_unload(self, model: str, reason: str) -> None:
        self.unloads.labels(model, reason).inc()
        self.model_bytes.labels(model).set(0)

    def observe_request(self, done: Finished, model: str) -> None:
        """After a request, on the engine thread: its counts, from its stats record."""
        self.prompt_tokens.labels(model).inc(done.prompt_tokens)
        self.completion_tokens.labels(model).inc(done.completion_tokens)
        self.cached_tokens.labels(model).inc(done.cached_tokens)
        self.cache_lookups.labels("hit" if done.cached_tokens else "miss", model).inc()
        self.ttft.labels(model).observe(done.ttft_seconds)
        if done.completion_tokens > done.first_tokens:
            self.itl.labels(model).observe(done.decode_seconds / (done.completion_tokens - done.first_tokens))
        stats = done.stats
        for j, (d, a) in enumerate(zip(stats.drafted_by_position, stats.accepted_by_position)):
            self.drafted_at.labels(str(j + 1), model).inc(d)
            self.accepted_at.labels(str(j + 1), model).inc(a)
        for k, seconds in zip(stats.draft_lengths, stats.step_seconds):
            self.draft_length.labels(model).observe(k)
            if seconds > 0:
                self.step_seconds.labels("speculative" if k else "plain", model).observe(seconds)
        for labels, (steps, drafted, accepted) in stats.by_kind.items():
            self.drafts.labels(*labels, model).inc(steps)
            self.draft_tokens.labels(*labels, model).inc(drafted)
            self.accepted_tokens.labels(*labels, model).inc(accepted)
        self.speculation_active.set(1 if stats.draft_lengths and stats.draft_lengths[-1] else 0)

    def observe_speedups(self, expected: float | None, realised: float | None) -> None:
        if expected is not None:
            self.speedup_expected.set(expected)
        if realised is not None:
            self.speedup_realised.set(realised)

    def observe_costs(self, costs) -> None:
        for k in range(costs.k_max + 1):
            self.cost_step.labels(str(k)).set(costs.predict(k))

    def observe_step(self, step, running: int) -> None:
        """After every step of the batch, on the engine thread: its forward (a
        daemon.engine.batch.StepReport; None: it ran none) and the requests still running."""
        self.running.set(running)
        if step is not None:
            self.batch_size.observe(step.sequences)
            self.batch_rows.observe(step.rows)
            self.batch_drafts.inc(step.drafted)

    def observe_memory(self, memory: Memory) -> None:
        for kind, value in (("active", memory.mlx_active_bytes), ("peak", memory.mlx_peak_bytes),
                            ("cache", memory.mlx_cache_bytes)):
            self.memory.labels(kind).set(value)

    def observe_prompt_cache(self, memory_bytes: int, disk_bytes: int) -> None:
        self.cache_bytes.labels("memory").set(memory_bytes)
        self.cache_bytes.labels("disk").set(disk_bytes)

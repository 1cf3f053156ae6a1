"""The engine thread: the one thread that owns MLX.

Requests wait in a bounded queue and are admitted first in, first out, as long as fewer than
`max_running` are decoding; the running ones are stepped together (daemon.engine.batch), so a new
request starts while long answers run. Every record the engine yields goes to the job's `deliver`
callback (on this thread; the server hops it onto its event loop). Jobs are checked between steps:
cancelled (client gone) or past its deadline, a job leaves the batch there and frees its rows.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import structlog
from mlx_lm.models.cache import make_prompt_cache

from daemon.cluster.faults import RankLost
from daemon.engine.batch import Batch
from daemon.engine.forward import PREFILL_CHUNK
from daemon.engine.generate import sequence
from daemon.engine.grammar import GrammarError
from daemon.engine.memory import CLEAR_EVERY, Memory, limit_cache, release
from daemon.engine.prompt_cache import PromptCache, cacheable, recurrent
from daemon.engine.records import Finished, Request
from daemon.models.block import is_block
from daemon.models.loading import LoadedModel, backend, on_gpu
from daemon.server.metrics import Metrics
from policies.registry import make_policy

log = structlog.get_logger()
SAVE_EVERY = 20  # requests between saves of the policy's calibration
LOST_JOIN_SECONDS = 2.0


class QueueFull(Exception):
    pass


class DeadlineExceeded(Exception):
    pass


@dataclass
class Job:
    request: Request
    speculation: str  # draft policy: off | fixed:K | adaptive
    deliver: Callable[[object], None]  # each Delta, then a Finished or an exception
    deadline: float  # time.monotonic() after which the job stops
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Limits:
    """How many requests decode together, and how big one step's forward may be (settings)."""

    max_running: int = 8
    max_rows: int = 64
    prefill_chunk: int = 64  # prompt rows a request prefills per step beside others

    @classmethod
    def of(cls, settings) -> Limits:
        return cls(settings.max_running, settings.max_batch_rows, settings.batch_prefill_chunk)


@dataclass(frozen=True)
class ServedModel:
    """What the HTTP side knows of the loaded model: names, its tokenizer and limits; no MLX."""

    name: str
    tokenizer: object  # mlx_lm TokenizerWrapper
    vocab_size: int
    context_length: int
    drafter: str | None  # the drafter's name; None: it has none
    drafter_kind: str | None = None  # "chained" (MTP layers, one draft a forward), or a block drafter's kind
    placement: str | None = None  # over several machines: how (daemon.cluster)
    speed_paths: dict | None = None  # the faster forms the start-up probe kept, and its timings (daemon.cpu.forms)
    recurrent: bool = False  # some layer keeps a recurrent state: the prompt cache keeps it at a request's turn ends

    @classmethod
    def of(cls, lm: LoadedModel) -> ServedModel:
        context = int(lm.config.get("max_position_embeddings", 4096))
        paths = {"forms": lm.forms.name, "probe_ms": lm.forms.probe_ms} if lm.forms is not None else None
        kind = (lm.drafter.config.kind if is_block(lm.drafter) else "chained") if lm.drafter else None
        return cls(lm.name, lm.tokenizer, lm.config["vocab_size"], context, lm.drafter_name if lm.drafter else None,
                   kind, lm.placement, paths, recurrent(make_prompt_cache(lm.model)))


@dataclass
class Loaded:
    """What the engine thread works with, made on that thread by the set-up callable."""

    lm: LoadedModel
    shared: object | None  # the adaptive policy's SharedEstimates (None without a drafter)
    prompt_cache: PromptCache | None
    tie_margin: float | None = None  # the near-tie guard's margin (None: by the model's precision)
    cluster: object | None = None  # daemon.cluster.launch.Cluster: the other ranks, when there are


class Worker:
    def __init__(self, setup: Callable[[], Loaded], max_queue: int, metrics: Metrics | None = None,
                 limits: Limits = Limits()):
        """setup: loads the model on the engine thread (MLX is used from that thread only).
        metrics: told about the model, every finished request, every batched step and MLX's
        memory, from this thread."""
        self._setup = setup
        self.metrics = metrics
        self.limits = limits
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="mtpd-engine", daemon=True)
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self.running = 0  # requests in the batch
        self._stopping = False  # stop() was called: finish what is running and queued
        self.jobs_done = 0
        self.lm: LoadedModel | None = None
        self.served: ServedModel | None = None  # once started
        self.shared = self.prompt_cache = self._tie_margin = self.cluster = None
        self.lost: RankLost | None = None  # a rank of the cluster is gone: nothing more is served
        self.on_lost: Callable[[RankLost], None] = lambda lost: None  # told once, from any thread
        self._lose_once = threading.Lock()
        self._batch: Batch | None = None
        self.memory = Memory()  # as of the last request or idle moment, taken on the engine thread

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    @property
    def busy(self) -> bool:
        return self.running > 0

    def costs(self) -> dict | None:
        """The adaptive policy's cost model as it stands, in ms (None without a drafter): one
        drafter forward, and a round of k drafts (k = 0: a plain step) drafted or copied."""
        if self.shared is None:
            return None
        c = self.shared.costs
        rounds = [round(c.predict(k) * 1e3, 3) for k in range(c.k_max + 1)]
        copies = [round(c.predict(k, lookup=True) * 1e3, 3) for k in range(c.k_max + 1)]
        return {"draft_ms": round(c.t_draft * 1e3, 3), "round_ms": rounds, "lookup_round_ms": copies, "block": c.block}

    def start(self) -> None:
        """Starts the thread and waits until the model is loaded (its error is raised here)."""
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            raise self._failed

    def submit(self, job: Job) -> None:
        if self.lost is not None:
            raise self.lost
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def stop(self, timeout: float | None = None) -> None:
        """Finishes the running and queued jobs, then ends the thread (a lost cluster's at once:
        its thread may still be waiting on a rank)."""
        self._queue.put(None)
        self._thread.join(timeout if self.lost is None else LOST_JOIN_SECONDS)
        if self.shared is not None:
            self.shared.save()

    def lose(self, lost: RankLost) -> None:
        """A rank is gone (from any thread): every running and queued job is failed with it, new
        ones are refused, the engine stops and `on_lost` is told."""
        if not self._lose_once.acquire(blocking=False):
            return
        self.lost = lost
        log.error("cluster lost", error=str(lost))
        for r in list(self._batch.running if self._batch is not None else ()):
            r.owner.deliver(lost)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.deliver(lost)
        self._queue.put(None)  # wakes the engine thread if it waits for work
        if self.cluster is not None:  # the ranks left end now, so no collective waits on them
            self.cluster.close()
        self.on_lost(lost)

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            if self.cluster is not None:
                self.cluster.close()
            mx.clear_streams()  # MLX needs each thread to release its streams (ml-explore/mlx#3126)

    def _loop(self) -> None:
        try:
            loaded = self._setup()
            self.lm, self.shared, self.prompt_cache = loaded.lm, loaded.shared, loaded.prompt_cache
            self._tie_margin, self.cluster = loaded.tie_margin, loaded.cluster
            if self.cluster is not None:
                self.cluster.on_lost = self.lose
            self.served = ServedModel.of(loaded.lm)
            if self.metrics is not None:
                self.metrics.describe_model(self.lm, backend())
            self._measure()
        except BaseException as e:  # handed to start()
            self._failed = e
            return
        finally:
            self._ready.set()
        rows = self.shared.rows if self.shared is not None else None
        draft_seconds = self.shared.costs.t_draft if self.shared is not None else 0.0
        batch = self._batch = Batch(self.lm.model, self._deliver, self.limits.max_rows, rows, draft_seconds,
                                    self.lm.drafter)
        steps = 0
        while (batch.running or not self._stopping) and self.lost is None:
            self._arrivals(batch, wait=True)
            busy = bool(batch.running)
            for r in list(batch.running):
                self._check(batch, r)
            self.running = len(batch.running)
            step = batch.step(lambda: self._arrivals(batch)) if batch.running else None  # late ones join its forward
            self.running = len(batch.running)
            if self.metrics is not None:
                self.metrics.observe_step(step, self.running)
            steps += step is not None
            if busy and (not batch.running or step is not None and steps % CLEAR_EVERY == 0):  # fell idle, or so often
                release()
                self._measure()

    def _arrivals(self, batch: Batch, wait: bool = False) -> None:
        """Admits queued jobs while the batch has room; `wait`: block for one when it is empty."""
        while not self._stopping and len(batch.running) < self.limits.max_running:
            try:
                job = self._queue.get(block=wait and not batch.running)
            except queue.Empty:
                return
            if job is None:
                self._stopping = True
            else:
                self._admit(batch, job)

    def _admit(self, batch: Batch, job: Job) -> None:
        if job.cancelled.is_set():
            return
        if time.monotonic() > job.deadline:
            job.deliver(DeadlineExceeded("the request waited in the queue past its timeout"))
            return
        if self.metrics is not None:
            self.metrics.queue_wait.observe(time.monotonic() - job.submitted)
        try:
            policy = make_policy(job.speculation, self.shared)
        except Exception as e:
            job.deliver(e)
            return
        def chunk() -> int:  # beside others: short forwards, so their answers keep going; alone: fast
            return self.limits.prefill_chunk if len(batch.running) > 1 else PREFILL_CHUNK

        batch.add(job, sequence(self.lm, job.request, policy, self._tie_margin, prompt_cache=self.prompt_cache,
                                chunk=chunk, batched=True))

    def _check(self, batch: Batch, r) -> None:
        """A job whose client left or whose time ran out leaves the batch."""
        job = r.owner
        if job.cancelled.is_set():
            batch.drop(r)
        elif time.monotonic() > job.deadline:
            batch.drop(r)
            job.deliver(DeadlineExceeded("the request ran past its timeout"))

    def _deliver(self, job: Job, record) -> None:
        lost = self.cluster.fault(record) if self.cluster is not None and isinstance(record, Exception) else None
        if lost is not None:
            self.lose(lost)
            return
        job.deliver(record)
        if isinstance(record, Finished):
            self.jobs_done += 1
            self._measure(record)
            if self.shared is not None and self.jobs_done % SAVE_EVERY == 0:
                self.shared.save()
        elif isinstance(record, GrammarError):  # the client's schema: said to the client, no traceback
            log.warning("grammar gave up", error=str(record))
        elif isinstance(record, Exception):
            log.error("generation failed", exc_info=record)  # the traceback goes to the log only

    def _measure(self, done: Finished | None = None) -> None:
        """After a request, and when the model is loaded or memory released (no `done`)."""
        self.memory = Memory.now(self.prompt_cache.nbytes if self.prompt_cache is not None else 0)
        if self.metrics is None:
            return
        m = self.metrics
        if done is not None:
            m.observe_request(done)
            expected = done.stats.expected_speedups
            rate = done.stats.speculative_rate()
            realised = rate * self.shared.costs.predict(0) if rate is not None and self.shared is not None else None
            m.observe_speedups(sum(expected) / len(expected) if expected else None, realised)
        if self.shared is not None:
            m.observe_costs(self.shared.costs)
        if self.prompt_cache is not None:
            m.observe_prompt_cache(self.prompt_cache.nbytes, self.prompt_cache.disk_bytes)
        m.observe_memory(self.memory)


def load_for_serving(settings, cluster=None) -> Loaded:
    """The model, its drafter, the policy's calibration and the prompt cache, as `settings` say;
    with a cluster (daemon.cluster.launch), rank 0's share of the model. Runs on the engine thread."""
    from daemon.engine.calibration import shared_estimates
    from daemon.models.loading import describe, load

    lm = load(settings.model, drafter=settings.drafter, drafter_bits=settings.drafter_bits, lazy=cluster is not None)
    log.info("model loaded", **describe(lm), mlx_cache_limit=limit_cache(settings.mlx_cache_bytes, on_gpu()))
    if cluster is not None:
        cluster.join(lm)
    shared = shared_estimates(lm, root=settings.cache_dir)
    prompt_cache = None
    if settings.prompt_cache_bytes and cluster is None and cacheable(make_prompt_cache(lm.model)):
        disk = None
        if settings.prompt_cache_disk_bytes:
            disk = settings.cache_dir / "prompts" / model_key(lm.path)
        prompt_cache = PromptCache(settings.prompt_cache_bytes, disk, settings.prompt_cache_disk_bytes)
    return Loaded(lm, shared, prompt_cache, settings.tie_margin, cluster)


def model_key(path: str) -> str:
    """Names the prompt-cache folder of a model: its path, and its size and time if it is a file."""
    p = Path(path)
    stamp = f"{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.is_file() else ""
    return hashlib.sha1(f"{path}|{stamp}".encode()).hexdigest()[:16]

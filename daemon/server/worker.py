"""The engine thread: the one thread that owns MLX.

Requests wait in a bounded queue and are admitted first in, first out, as long as fewer than
`max_running` are decoding; the running ones are stepped together (daemon.engine.batch), so a new
request starts while long answers run. Each loaded model has its own batch, and the batches are
stepped in turn; a request for a model not loaded loads it first (daemon.server.pool: memory
budget, keep-alive). Every record the engine yields goes to the job's `deliver`
callback (on this thread; the server hops it onto its event loop). Jobs are checked between steps:
cancelled (client gone) or past its deadline, a job leaves the batch there and frees its rows.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import structlog
from mlx_lm.models.cache import make_prompt_cache

from daemon.cluster.faults import RankLost
from daemon.engine.batch import Batch
from daemon.engine.forward import PREFILL_CHUNK
from daemon.engine.generate import sequence
from daemon.engine.grammar import GrammarError
from daemon.engine.memory import CLEAR_EVERY, Memory, release
from daemon.engine.prompt_cache import recurrent
from daemon.engine.records import Finished, Request
from daemon.models.block import is_block
from daemon.models.loading import DEFAULT_NAME, LoadedModel, backend, on_gpu
from daemon.models.registry import Entry
from daemon.server.loaded import Loaded
from daemon.server.metrics import Metrics
from daemon.server.openai_shapes import ApiError
from daemon.server.pool import Pool, Resident
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
    model: str = DEFAULT_NAME  # the name of a model of the worker's `models`


@dataclass
class Wanted:
    """A request for a model's ServedModel (its tokenizer, limits), loading it if it never was:
    `deliver` gets the ServedModel or an exception."""

    model: str
    deliver: Callable[[object], None]
    deadline: float
    cancelled: threading.Event = field(default_factory=threading.Event)


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
    speculation: str | None = None  # its default draft policy (None: the `speculation` setting)

    @classmethod
    def of(cls, lm: LoadedModel, speculation: str | None = None, name: str | None = None) -> ServedModel:
        """`name`: the one requests use (the registry's; default: the model's own)."""
        context = int(lm.config.get("max_position_embeddings", 4096))
        paths = {"forms": lm.forms.name, "probe_ms": lm.forms.probe_ms} if lm.forms is not None else None
        kind = (lm.drafter.config.kind if is_block(lm.drafter) else "chained") if lm.drafter else None
        return cls(name or lm.name, lm.tokenizer, lm.config["vocab_size"], context, lm.drafter_name if lm.drafter else None,
                   kind, lm.placement, paths, recurrent(make_prompt_cache(lm.model)), speculation)


class Worker:
    def __init__(self, setup: Callable[[Entry], Loaded], max_queue: int, metrics: Metrics | None = None,
                 limits: Limits = Limits(), models: dict[str, Entry] | None = None, budget: int | None = None):
        """setup: loads a model on the engine thread (MLX is used from that thread only); the first
        of `models` (default: the one setup loads for a bare Entry) at start, the others when a
        request names them. budget: bytes their weights may take together (None: no bound).
        metrics: told about the models, every finished request, every batched step and MLX's
        memory, from this thread."""
        self._setup = setup
        self.models = models or {DEFAULT_NAME: Entry(DEFAULT_NAME, None, "model")}
        self.metrics = metrics
        self.limits = limits
        self._budget = budget
        self._queue: queue.Queue[Job | Wanted | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="mtpd-engine", daemon=True)
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self.running = 0  # requests in the batches
        self._stopping = False  # stop() was called: finish what is running and queued
        self.jobs_done = 0
        self.served: ServedModel | None = None  # the default model's, once started
        self.known: dict[str, ServedModel] = {}  # every model loaded once, by name (kept after it is unloaded)
        self.loading = 0  # requests waiting for their model to load
        self.shared = self.cluster = None  # the default model's (the page's cost model)
        self.lost: RankLost | None = None  # a rank of the cluster is gone: nothing more is served
        self.on_lost: Callable[[RankLost], None] = lambda lost: None  # told once, from any thread
        self._lose_once = threading.Lock()
        self._pool: Pool | None = None
        self._pending: list = []  # jobs whose model waits for room
        self._steps = 0  # batched forwards run
        self.memory = Memory()  # as of the last request or idle moment, taken on the engine thread

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._pending)

    @property
    def loaded(self) -> dict[str, int]:
        """The models loaded now: their bytes."""
        return self._pool.loaded if self._pool is not None else {}

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
        """Starts the thread and waits until the default model is loaded (its error is raised here)."""
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            raise self._failed

    def submit(self, job: Job | Wanted) -> None:
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
        for resident in list(self._pool.residents.values()) if self._pool is not None else ():
            if resident.loaded.shared is not None:
                resident.loaded.shared.save()

    def lose(self, lost: RankLost) -> None:
        """A rank is gone (from any thread): every running and queued job is failed with it, new
        ones are refused, the engine stops and `on_lost` is told."""
        if not self._lose_once.acquire(blocking=False):
            return
        self.lost = lost
        log.error("cluster lost", error=str(lost))
        for resident in list(self._pool.residents.values()) if self._pool is not None else ():
            for r in list(resident.batch.running):
                r.owner.deliver(lost)
        for job in self._pending:
            job.deliver(lost)
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

    def _open(self, entry: Entry) -> Resident:
        """Loads one model and makes its batch (on this thread)."""
        loaded = self._setup(entry)
        lm, shared = loaded.lm, loaded.shared
        mx.eval(lm.model.parameters(), lm.drafter.parameters() if lm.drafter is not None else [])
        served = ServedModel.of(lm, entry.speculation, entry.name)
        rows = shared.rows if shared is not None else None
        batch = Batch(lm.model, self._deliver, self.limits.max_rows, rows, shared.costs.t_draft if shared else 0.0,
                      lm.drafter, shared)
        self.known[entry.name] = served
        return Resident(entry, loaded, batch, served, 0, time.monotonic())

    def _loop(self) -> None:
        try:
            self._pool = pool = Pool(self._budget or 1 << 62, on_gpu(), self._open, self.metrics, mx.get_active_memory)
            first = next(iter(self.models.values()))
            resident = pool.open(first)
            self.served, self.shared, self.cluster = resident.served, resident.loaded.shared, resident.loaded.cluster
            if self.cluster is not None:
                self.cluster.on_lost = self.lose
            if self.metrics is not None:
                self.metrics.describe_model(resident.loaded.lm, backend())
            self._measure()
        except BaseException as e:  # handed to start()
            self._failed = e.__cause__ if isinstance(e, ApiError) and e.__cause__ is not None else e
            return
        finally:
            self._ready.set()
        del resident  # nothing here may hold a model the pool unloads
        while (pool.running() or self._pending or not self._stopping) and self.lost is None:
            self._arrivals(wait=True)
            for name in list(pool.residents):  # each model's batch one step in turn: none starves another
                self._step(pool.residents[name])
            self.running = pool.running()
            pool.expire(time.monotonic())

    def _step(self, resident: Resident) -> None:
        batch = resident.batch
        if not batch.running:
            return
        for r in list(batch.running):
            self._check(batch, r)
        step = batch.step(self._arrivals) if batch.running else None  # late ones join its forward
        resident.used = time.monotonic()
        self.running = self._pool.running()
        if self.metrics is not None:
            self.metrics.observe_step(step, self.running)
        self._steps += step is not None
        if not batch.running or step is not None and self._steps % CLEAR_EVERY == 0:  # fell idle, or so often
            release()
            self._measure()

    def _arrivals(self, wait: bool = False) -> None:
        """Admits queued jobs while the batches have room; `wait`: block for one while nothing
        runs (no longer than the next model's keep_alive)."""
        pool = self._pool
        if not wait:  # inside a step: models are not loaded now
            self._take(block=False, may_load=False)
            return
        self._pending, pending = [], self._pending
        for job in pending:
            self._admit(job)
        block = not pool.running() and not self._pending
        timeout = pool.next_expiry(time.monotonic()) if block else None
        self._take(block, may_load=True, timeout=timeout)

    def _take(self, block: bool, may_load: bool, timeout: float | None = None) -> None:
        while not self._stopping and self._pool.running() < self.limits.max_running:
            try:
                job = self._queue.get(block=block, timeout=timeout)
            except queue.Empty:
                return
            block = False
            if job is None:
                self._stopping = True
            else:
                self._admit(job, may_load)

    def _admit(self, job: Job | Wanted, may_load: bool = True) -> None:
        """Into its model's batch; a model not loaded is loaded first, unless `may_load` is False
        (inside another model's step): then the job waits for the next turn of the loop."""
        if job.cancelled.is_set():
            return
        if time.monotonic() > job.deadline:
            job.deliver(DeadlineExceeded("the request waited in the queue past its timeout"))
            return
        if not may_load and job.model not in self._pool.residents:
            self._pending.append(job)
            return
        try:
            resident = self._pool.open(self.models[job.model])
        except Exception as e:  # an ApiError for the client (too large, broken); anything else, a 500
            job.deliver(e)
            return
        if resident is None:  # room only once a model answering now is done
            self._pending.append(job)
            return
        resident.used = time.monotonic()
        if isinstance(job, Wanted):
            job.deliver(resident.served)
            return
        if self.metrics is not None:
            self.metrics.queue_wait.observe(time.monotonic() - job.submitted)
        loaded, batch = resident.loaded, resident.batch
        try:
            policy = make_policy(job.speculation, loaded.shared)
        except Exception as e:
            job.deliver(e)
            return

        def chunk() -> int:  # beside others: short forwards, so their answers keep going; alone: fast
            return self.limits.prefill_chunk if len(batch.running) > 1 else PREFILL_CHUNK

        batch.add(job, sequence(loaded.lm, job.request, policy, loaded.tie_margin, prompt_cache=loaded.prompt_cache,
                                chunk=chunk, batched=True))
        self.running = self._pool.running()

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
            resident = self._pool.residents.get(job.model)
            self._measure(record, resident)
            shared = resident.loaded.shared if resident is not None else None
            if shared is not None and self.jobs_done % SAVE_EVERY == 0:
                shared.save()
        elif isinstance(record, GrammarError):  # the client's schema: said to the client, no traceback
            log.warning("grammar gave up", error=str(record))
        elif isinstance(record, Exception):
            log.error("generation failed", exc_info=record)  # the traceback goes to the log only

    def _measure(self, done: Finished | None = None, resident: Resident | None = None) -> None:
        """After a request, and when a model is loaded or memory released (no `done`)."""
        residents = self._pool.residents.values()
        caches = [r.loaded.prompt_cache for r in residents if r.loaded.prompt_cache is not None]
        self.memory = Memory.now(sum(c.nbytes for c in caches))
        if self.metrics is None:
            return
        m = self.metrics
        shared = resident.loaded.shared if resident is not None else None
        if done is not None:
            m.observe_request(done, resident.entry.name if resident is not None else "")
            expected = done.stats.expected_speedups
            rate = done.stats.speculative_rate()
            realised = rate * shared.costs.predict(0) if rate is not None and shared is not None else None
            m.observe_speedups(sum(expected) / len(expected) if expected else None, realised)
        if shared is not None:
            m.observe_costs(shared.costs)
        if caches:
            m.observe_prompt_cache(sum(c.nbytes for c in caches), sum(c.disk_bytes for c in caches))
        m.observe_memory(self.memory)

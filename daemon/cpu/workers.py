"""Work split over processes with one BLAS thread each, for a model on the CPU.

One MLX process with every core on its BLAS leaves cores idle through the single-threaded parts of a
forward (everything but the matrix products); as many processes as cores, one BLAS thread each,
keep them busy (docs/training.md has the figures).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable

from daemon.cpu.blas import THREAD_VARS
from daemon.models.loading import on_gpu

MAX_WORKERS = 8  # each holds its own copy of the target
PARENT_POLL_S = 1.0  # how often a worker checks that the process that started it is alive
_ONE_THREAD = dict.fromkeys(THREAD_VARS, "1")


def count(requested: int) -> int:
    """`requested` when positive; else one per core on the CPU (at most MAX_WORKERS), one on Metal."""
    if requested > 0:
        return requested
    return 1 if on_gpu() else max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def _orphan_safe(target: Callable, parent: int, *args) -> None:
    """A worker's body: `target(*args)`, ended at once if its parent dies (killed, it cannot
    stop its workers: they would go on taking the cores)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    target(*args)


def run(target: Callable, jobs: list[tuple], on_message: Callable[[object], None]) -> None:
    """Runs `target(*job, messages)` for every job, each in its own spawned process with one BLAS
    thread; what a job puts on `messages` reaches `on_message` here, in order. Returns when all have
    ended; as soon as one fails, stops the others and raises (its traceback is on stderr). If this
    process is killed, the workers end within PARENT_POLL_S."""
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    saved = {name: os.environ.get(name) for name in _ONE_THREAD}
    os.environ.update(_ONE_THREAD)  # read by the BLAS when a child loads it, so set before the start
    try:
        processes = [context.Process(target=_orphan_safe, args=(target, os.getpid(), *job, messages), daemon=True)
                     for job in jobs]
        for process in processes:
            process.start()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
    while any(p.is_alive() for p in processes) or not messages.empty():
        try:
            on_message(messages.get(timeout=0.5))
        except queue.Empty:
            pass
        failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
        if failed:  # the others may be waiting on it (a data-parallel step): stop them
            for process in processes:
                process.terminate()
            raise RuntimeError(f"{len(failed)} of {len(processes)} worker processes failed (exit codes {failed})")

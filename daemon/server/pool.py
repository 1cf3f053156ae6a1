"""The loaded models, on the engine thread: each with its own continuous batch, loaded when a
request names it, unloaded when unused for its `keep_alive_s` or to make room under the memory
budget (the least recently used, unpinned, idle one first). Sizes are measured at load (MLX's
active memory before and after); before a first load they are estimated from the files."""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from daemon.engine.memory import release
from daemon.models.checkpoint import itemsize, tensor_shapes
from daemon.models.loading import unload
from daemon.models.registry import Entry
from daemon.server.openai_shapes import ApiError

log = structlog.get_logger()
GiB = 1 << 30
GGUF_ON_CPU = 8  # a 4-bit GGUF's weights grow about this much as fp32 (the CPU runs fp32)


def estimate_bytes(entry: Entry, quantized: bool) -> int:
    """The weights' bytes once loaded, from the files: a GGUF's size (times GGUF_ON_CPU on the
    CPU); a folder's tensors, at fp32 on the CPU (a quantized folder's packed weights unpacked)."""
    path = entry.file()
    if path.is_file():
        return path.stat().st_size * (1 if quantized else GGUF_ON_CPU)
    bits = json.loads((path / "config.json").read_text()).get("quantization", {}).get("bits")
    total = 0
    for key, (_, count, dtype) in tensor_shapes(path).items():
        if quantized:
            total += count * itemsize(dtype)
        elif bits and dtype == "U32":
            total += count * (32 // bits) * 4
        elif not (bits and key.endswith((".scales", ".biases"))):
            total += count * 4
    return total


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _unloadable(entry: Entry, e: Exception) -> ApiError:
    log.error("model load failed", model=entry.name, path=entry.path, error=str(e))
    return ApiError(400, f"the model {entry.name!r} could not be loaded: {e}", "model", "model_load_failed")


@dataclass
class Resident:
    entry: Entry
    loaded: object  # daemon.server.worker.Loaded
    batch: object  # daemon.engine.batch.Batch
    served: object  # daemon.server.worker.ServedModel
    bytes: int
    used: float  # time.monotonic() of its last request or step

    @property
    def idle(self) -> bool:
        return not self.batch.running


class Pool:
    def __init__(self, budget: int, quantized: bool, open_model: Callable[[Entry], Resident], metrics=None,
                 active_bytes: Callable[[], int] = lambda: 0):
        """open_model: loads an entry's model and makes its batch (its `bytes` is filled here);
        active_bytes: MLX's active memory (the worker's, which alone imports MLX)."""
        self.budget, self.quantized, self._open, self.metrics = budget, quantized, open_model, metrics
        self._active = active_bytes
        self.residents: dict[str, Resident] = {}
        self.sizes: dict[str, int] = {}  # measured at each model's last load
        self.loaded: dict[str, int] = {}  # the loaded models' bytes, replaced whole (read from other threads)

    def running(self) -> int:
        return sum(len(r.batch.running) for r in self.residents.values())

    def in_use(self) -> int:
        return sum(r.bytes for r in self.residents.values())

    def open(self, entry: Entry) -> Resident | None:
        """The entry's model, loaded if it is not; None while room can only be made by unloading a
        model that is answering (ask again after a step). Raises ApiError (400) when the model
        cannot fit even alone, or cannot be loaded."""
        if entry.name in self.residents:
            return self.residents[entry.name]
        try:
            need = self.sizes.get(entry.name) or estimate_bytes(entry, self.quantized)
        except Exception as e:
            raise _unloadable(entry, e) from e
        if need > self.budget:
            raise ApiError(400, f"the model {entry.name!r} needs about {gib(need)}, more than max_memory "
                                f"({gib(self.budget)}) allows", "model", "model_too_large")
        while self.in_use() + need > self.budget:
            idle = {name: r.used for name, r in self.residents.items() if r.idle and not r.entry.pinned}
            if not idle:
                return None
            self.close(min(idle, key=idle.get), "memory")
        start, before = time.perf_counter(), self._active()
        try:
            resident = self._open(entry)
        except Exception as e:
            raise _unloadable(entry, e) from e
        resident.bytes = max(self._active() - before, 0) or need
        self.sizes[entry.name] = resident.bytes
        self.residents[entry.name] = resident
        self.loaded = {name: r.bytes for name, r in self.residents.items()}
        seconds = time.perf_counter() - start
        log.info("model opened", model=entry.name, seconds=round(seconds, 3), bytes=resident.bytes,
                 loaded=list(self.residents))
        if self.metrics is not None:
            self.metrics.observe_load(entry.name, seconds, resident.bytes)
        return resident

    def close(self, name: str, reason: str) -> None:
        """Unloads a model: its weights, drafter, batch, prompt cache; its calibration is saved."""
        resident = self.residents.pop(name)
        if resident.loaded.shared is not None:
            resident.loaded.shared.save()
        unload(resident.loaded.lm)
        del resident
        gc.collect()
        release()
        self.loaded = {n: r.bytes for n, r in self.residents.items()}  # said once the memory is back
        log.info("model closed", model=name, reason=reason, loaded=list(self.residents))
        if self.metrics is not None:
            self.metrics.observe_unload(name, reason)

    def expire(self, now: float) -> None:
        """Unloads the idle models whose keep_alive_s has run out."""
        due = [name for name, r in self.residents.items()
               if r.idle and r.entry.keep_alive_s >= 0 and now - r.used >= r.entry.keep_alive_s]
        for name in due:  # by name: a reference held here would keep the model's memory until after release()
            self.close(name, "keep_alive")

    def next_expiry(self, now: float) -> float | None:
        """Seconds until the next idle model's keep_alive_s runs out (None: none will)."""
        due = [r.used + r.entry.keep_alive_s - now for r in self.residents.values()
               if r.idle and r.entry.keep_alive_s >= 0]
        return max(min(due), 0.0) if due else None

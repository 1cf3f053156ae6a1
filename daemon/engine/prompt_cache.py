"""The prompt cache: the target's KV cache for prompts seen recently, reused for the longest common
prefix of the next prompt (multi-turn chat, shared system prompts).

Entries live in memory, least recently used first out, bounded in bytes. Entries marked
`persist` (system prompts) are also written to disk, atomically (temporary file, then rename), so a
restarted daemon finds them; a file that cannot be read is deleted, never fatal, and so are the
temporary files of writes that were killed. A disk that is full or read-only keeps entries in memory
only (logged once). Each entry keeps the hidden states the drafter reads, so a speculative request
can start from it too.
Runs on the thread that owns MLX.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
import structlog
from mlx_lm.models.cache import KVCache

log = structlog.get_logger()
TMP_SUFFIX = ".tmp.safetensors"  # a write in progress, or one that was killed


@dataclass
class PromptState:
    """The target's cache after exactly `ids`, and the hidden states over them (or None)."""

    ids: tuple[int, ...]
    keys: list[mx.array]  # per layer [1, kv_heads, len(ids), head_dim]
    values: list[mx.array]
    hidden: mx.array | None = None  # [1, len(ids), H]
    hidden_source: str | None = None

    @property
    def nbytes(self) -> int:
        arrays = [*self.keys, *self.values] + ([self.hidden] if self.hidden is not None else [])
        return sum(a.nbytes for a in arrays)


@dataclass
class Reuse:
    """What a lookup hands the engine: a fresh cache holding the first `length` positions."""

    length: int
    cache: list[KVCache]
    hidden: mx.array | None


def cacheable(cache: list) -> bool:
    return all(type(c) is KVCache for c in cache)


def snapshot(ids, cache: list[KVCache], hidden: mx.array | None, hidden_source: str | None) -> PromptState:
    """A copy of `cache` (which holds exactly len(ids) positions) that later writes cannot touch."""
    n = len(ids)
    keys = [mx.contiguous(c.keys[..., :n, :]) for c in cache]
    values = [mx.contiguous(c.values[..., :n, :]) for c in cache]
    hidden = None if hidden is None else mx.contiguous(hidden[:, :n])
    mx.eval(keys, values, *([hidden] if hidden is not None else []))
    return PromptState(tuple(ids), keys, values, hidden, hidden_source)


def restore(state: PromptState, length: int) -> list[KVCache]:
    cache = []
    for k, v in zip(state.keys, state.values):
        c = KVCache()
        c.state = (k[..., :length, :], v[..., :length, :], length)
        cache.append(c)
    return cache


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class PromptCache:
    def __init__(self, max_bytes: int, directory: Path | None = None, max_disk_bytes: int = 0):
        self.max_bytes = max_bytes
        self.directory = directory
        self.max_disk_bytes = max_disk_bytes
        self._memory: OrderedDict[tuple[int, ...], PromptState] = OrderedDict()
        self._disk: dict[tuple[int, ...], Path] = {}
        self.hits = self.misses = 0
        self.hit_tokens = 0
        self._unwritable = False  # a write failed (logged once)
        if directory is not None:
            self._scan_disk()

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._memory.values())

    @property
    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._disk.values() if p.exists())

    def lookup(self, ids: tuple[int, ...], hidden_source: str | None) -> Reuse | None:
        """The longest cached prefix of `ids` (leaving at least one token to run). With a
        `hidden_source`, only entries holding those hidden states count."""
        best, best_len = None, 0
        for key in [*self._memory, *self._disk]:
            n = min(common_prefix(key, ids), len(ids) - 1)
            if n > best_len:
                best, best_len = key, n
        state = self._get(best) if best is not None else None
        if state is not None and hidden_source is not None and state.hidden_source != hidden_source:
            state = None
        if state is None:
            self.misses += 1
            return None
        self.hits += 1
        self.hit_tokens += best_len
        hidden = None if state.hidden is None else state.hidden[:, :best_len]
        return Reuse(best_len, restore(state, best_len), hidden)

    def store(self, state: PromptState, persist: bool = False) -> None:
        if state.nbytes > self.max_bytes:
            return
        self._memory[state.ids] = state
        self._memory.move_to_end(state.ids)
        while self.nbytes > self.max_bytes:
            self._memory.popitem(last=False)
        if persist and self.directory is not None and state.ids not in self._disk:
            self._write(state)

    def _get(self, key) -> PromptState | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        state = self._read(self._disk[key])
        if state is None:
            del self._disk[key]
            return None
        self.store(state)
        return state

    # -- disk --------------------------------------------------------------------------------

    def _path(self, ids) -> Path:
        return self.directory / (hashlib.sha1(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:24] + ".safetensors")

    def _write(self, state: PromptState) -> None:
        path = self._path(state.ids)
        tmp = path.with_name(path.stem + f".{os.getpid()}{TMP_SUFFIX}")
        arrays = {"ids": mx.array(state.ids, dtype=mx.int32)}
        for i, (k, v) in enumerate(zip(state.keys, state.values)):
            arrays[f"keys.{i}"], arrays[f"values.{i}"] = k, v
        if state.hidden is not None:
            arrays["hidden"] = state.hidden
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            mx.save_safetensors(str(tmp), arrays, metadata={"hidden_source": state.hidden_source or ""})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # MLX raises RuntimeError for a failed write (ENOSPC)
            _remove(tmp)
            if not self._unwritable:
                log.warning("prompt cache not written to disk", directory=str(self.directory), error=str(e))
            self._unwritable = True
            return
        self._disk[state.ids] = path
        self._trim_disk()
        log.info("prompt cached on disk", tokens=len(state.ids), file=path.name)

    def _trim_disk(self) -> None:
        files = sorted(self._disk.items(), key=lambda item: item[1].stat().st_mtime)
        total = sum(p.stat().st_size for _, p in files)
        for ids, path in files:
            if total <= self.max_disk_bytes:
                break
            total -= path.stat().st_size
            _remove(path)
            del self._disk[ids]

    def _read(self, path: Path) -> PromptState | None:
        try:
            arrays, meta = mx.load(str(path), return_metadata=True)
            layers = sum(1 for name in arrays if name.startswith("keys."))
            state = PromptState(
                tuple(arrays["ids"].tolist()),
                [arrays[f"keys.{i}"] for i in range(layers)],
                [arrays[f"values.{i}"] for i in range(layers)],
                arrays.get("hidden"),
                meta.get("hidden_source") or None,
            )
            if any(k.shape[2] != len(state.ids) for k in state.keys):
                raise ValueError("cache length does not match its token ids")
        except Exception as e:  # a damaged file must never stop the daemon
            _drop_unreadable(path, e)
            return None
        with contextlib.suppress(OSError):  # the most recently used is trimmed last (not on a read-only disk)
            path.touch()
        return state

    def _scan_disk(self) -> None:
        """Finds the entries on disk; removes what killed writes left, damaged files and the oldest
        entries past `max_disk_bytes` (where the disk lets it)."""
        if not self.directory.is_dir():
            return
        for path in self.directory.glob("*.safetensors"):
            if path.name.endswith(TMP_SUFFIX):
                _remove(path)
                continue
            try:
                ids = mx.load(str(path))["ids"].tolist()
            except Exception as e:
                _drop_unreadable(path, e)
                continue
            self._disk[tuple(ids)] = path
        self._trim_disk()


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only disk keeps it; it is never read
        path.unlink(missing_ok=True)


def _drop_unreadable(path: Path, error: Exception) -> None:
    log.warning("unreadable prompt cache file", file=str(path), error=str(error))
    _remove(path)

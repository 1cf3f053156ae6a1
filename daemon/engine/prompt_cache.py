"""The prompt cache: the target's cache for prompts seen recently, reused for the longest common
prefix of the next prompt (multi-turn chat, shared system prompts).

Attention layers (KVCache) are kept over the whole prompt and cut to any prefix. A layer that
cannot be cut (ArraysCache: the recurrent state of Gated DeltaNet in Qwen3.5 / 3.6 / Next, of Mamba
in Nemotron-H) is kept whole at a few lengths only, the marks its request named (where a
conversation's next turn will still agree: daemon.server.prepare) and the prompt's end; on such a
model an entry is reused at the longest of its lengths that the next prompt starts with.

Entries live in memory, least recently used first out, bounded in bytes (recurrent states
included). Entries marked `persist` (system prompts) are also written to disk, atomically
(temporary file, then rename), so a restarted daemon finds them; a file that cannot be read is
deleted, never fatal, and so are the temporary files of writes that were killed. A disk that is
full or read-only keeps entries in memory only (logged once). Each entry keeps the hidden states
the drafter reads, so a speculative request can start from it too.
Runs on the thread that owns MLX.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
import structlog
from mlx_lm.models.cache import ArraysCache, KVCache

log = structlog.get_logger()
TMP_SUFFIX = ".tmp.safetensors"  # a write in progress, or one that was killed

States = list[list[mx.array]]  # per layer that cannot be cut, in layer order: its arrays (ArraysCache.cache)


@dataclass
class PromptState:
    """The target's cache after exactly `ids`: each attention layer's keys and values (None for a
    layer that cannot be cut), the other layers' whole states at a few lengths, and the hidden
    states over `ids` (or None)."""

    ids: tuple[int, ...]
    keys: list[mx.array | None]  # per layer [1, kv_heads, len(ids), head_dim]
    values: list[mx.array | None]
    hidden: mx.array | None = None  # [1, len(ids), H]
    hidden_source: str | None = None
    states: dict[int, States] = field(default_factory=dict)  # length -> the recurrent layers' arrays there

    @property
    def nbytes(self) -> int:
        arrays = [a for a in (*self.keys, *self.values, self.hidden) if a is not None]
        arrays += [a for layers in self.states.values() for layer in layers for a in layer]
        return sum(a.nbytes for a in arrays)

    def reach(self, n: int) -> int:
        """The longest prefix of at most `n` tokens this entry can be restored to: any, when every
        layer can be cut; else the longest length its recurrent states were kept at."""
        if all(k is not None for k in self.keys):
            return n
        return max((m for m in self.states if m <= n), default=0)


@dataclass
class Reuse:
    """What a lookup hands the engine: its fresh cache, now holding the first `length` positions."""

    length: int
    cache: list
    hidden: mx.array | None


def recurrent(cache: list) -> bool:
    """Whether some layer of the cache cannot be cut to a prefix (a recurrent state): it is kept
    whole, at the lengths a request marks."""
    return any(isinstance(c, ArraysCache) for c in cache)


def cacheable(cache: list) -> bool:
    """Whether the prompt cache can keep this model's cache: attention layers it cuts, recurrent
    layers it keeps whole."""
    return all(type(c) is KVCache or isinstance(c, ArraysCache) for c in cache)


def pauses(cache: list, marks: tuple[int, ...], persist: int, cached: int, length: int) -> list[int]:
    """Where a prefill from `cached` stops to keep the cache: at the system prompt kept on disk
    (`persist`), and, where some layer cannot be cut, at the request's `marks`; only lengths
    between `cached` and the prompt's `length`, in order."""
    kept = {persist, *(marks if recurrent(cache) else ())}
    return sorted(m for m in kept if cached < m < length)


def recurrent_states(cache: list) -> States:
    """Copies of what each layer that cannot be cut holds now, which later writes cannot touch."""
    states = [[mx.contiguous(a) for a in c.cache] for c in cache if isinstance(c, ArraysCache)]
    mx.eval(states)
    return states


def snapshot(ids, cache: list, hidden: mx.array | None, hidden_source: str | None,
             states: dict[int, States] | None = None) -> PromptState:
    """A copy of `cache` (which holds exactly len(ids) positions) that later writes cannot touch.
    `states`: the recurrent layers' states at shorter lengths (`recurrent_states`), kept beside
    their states at len(ids)."""
    n = len(ids)
    attention = [not isinstance(c, ArraysCache) for c in cache]
    keys = [mx.contiguous(c.keys[..., :n, :]) if a else None for c, a in zip(cache, attention)]
    values = [mx.contiguous(c.values[..., :n, :]) if a else None for c, a in zip(cache, attention)]
    hidden = None if hidden is None else mx.contiguous(hidden[:, :n])
    mx.eval([a for a in (*keys, *values, hidden) if a is not None])
    kept = {**(states or {}), n: recurrent_states(cache)} if not all(attention) else {}
    return PromptState(tuple(ids), keys, values, hidden, hidden_source, kept)


def restore(state: PromptState, length: int, cache: list) -> list:
    """Fills the fresh `cache` (make_prompt_cache) with `state`'s first `length` positions, a
    length `state.reach` allows."""
    recurrent = iter(state.states.get(length, ()))
    for c, k, v in zip(cache, state.keys, state.values):
        if isinstance(c, ArraysCache):
            c.cache = list(next(recurrent))  # the model assigns new arrays, never writes into these
        else:
            c.state = (k[..., :length, :], v[..., :length, :], length)
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

    def lookup(self, ids: tuple[int, ...], hidden_source: str | None, cache: list) -> Reuse | None:
        """The longest cached prefix of `ids` (leaving at least one token to run), restored into
        the fresh `cache`. With a `hidden_source`, only entries holding those hidden states count."""
        cut = not recurrent(cache)
        best, best_len = None, 0
        for key in [*self._memory, *self._disk]:
            n = self._reach(key, min(common_prefix(key, ids), len(ids) - 1), cut)
            if n > best_len:
                best, best_len = key, n
        state = self._get(best) if best is not None else None
        if state is not None and hidden_source is not None and state.hidden_source != hidden_source:
            state = None
        if state is not None and state.reach(best_len) != best_len:  # a file without the states it should hold
            state = None
        if state is None:
            self.misses += 1
            return None
        self.hits += 1
        self.hit_tokens += best_len
        hidden = None if state.hidden is None else state.hidden[:, :best_len]
        return Reuse(best_len, restore(state, best_len, cache), hidden)

    def _reach(self, key: tuple[int, ...], n: int, cut: bool) -> int:
        """How many of the `n` tokens `key`'s entry shares with a prompt it can give back. An entry
        on disk of a model that cannot cut holds its states at its own end (a system prompt's)."""
        if key in self._memory:
            return self._memory[key].reach(n)
        return n if cut or n == len(key) else 0

    def store(self, state: PromptState, persist: bool = False) -> None:
        """Keeps `state`; an entry for the same ids keeps the recurrent states it had too."""
        if state.ids in self._memory:
            state.states = self._memory[state.ids].states | state.states
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
            if k is not None:
                arrays[f"keys.{i}"], arrays[f"values.{i}"] = k, v
        for length, layers in state.states.items():
            for j, layer in enumerate(layers):
                for a, array in enumerate(layer):
                    arrays[f"states.{length}.{j}.{a}"] = array
        if state.hidden is not None:
            arrays["hidden"] = state.hidden
        metadata = {"hidden_source": state.hidden_source or "", "layers": str(len(state.keys))}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            mx.save_safetensors(str(tmp), arrays, metadata=metadata)
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
            ids = tuple(arrays["ids"].tolist())
            layers = int(meta.get("layers") or sum(1 for name in arrays if name.startswith("keys.")))
            states = _read_states(arrays)
            state = PromptState(ids, [arrays.get(f"keys.{i}") for i in range(layers)],
                                [arrays.get(f"values.{i}") for i in range(layers)], arrays.get("hidden"),
                                meta.get("hidden_source") or None, states)
            if any(k is not None and k.shape[2] != len(ids) for k in state.keys) or any(m > len(ids) for m in states):
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


def _read_states(arrays: dict[str, mx.array]) -> dict[int, States]:
    """The recurrent states in a file's arrays, each named states.<length>.<layer>.<array>."""
    named = {tuple(int(p) for p in name.split(".")[1:]): a for name, a in arrays.items() if name.startswith("states.")}
    states: dict[int, States] = {}
    for (length, j, _), a in sorted(named.items()):  # keys are unique: arrays are never compared
        layers = states.setdefault(length, [])
        if j == len(layers):
            layers.append([])
        layers[j].append(a)
    return states


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only disk keeps it; it is never read
        path.unlink(missing_ok=True)


def _drop_unreadable(path: Path, error: Exception) -> None:
    log.warning("unreadable prompt cache file", file=str(path), error=str(error))
    _remove(path)

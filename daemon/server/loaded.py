"""What the engine thread holds of one loaded model (`Loaded`), and how the daemon loads one as
its settings say (`load_for_serving`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import structlog
from mlx_lm.models.cache import make_prompt_cache

from daemon.engine.memory import limit_cache
from daemon.engine.prompt_cache import PromptCache, cacheable
from daemon.models.loading import LoadedModel, on_gpu
from daemon.models.registry import Entry

log = structlog.get_logger()


@dataclass
class Loaded:
    """What the engine thread works with, made on that thread by the set-up callable."""

    lm: LoadedModel
    shared: object | None  # the adaptive policy's SharedEstimates (None without a drafter)
    prompt_cache: PromptCache | None
    tie_margin: float | None = None  # the near-tie guard's margin (None: by the model's precision)
    cluster: object | None = None  # daemon.cluster.launch.Cluster: the other ranks, when there are


def load_for_serving(settings, entry: Entry, cluster=None) -> Loaded:
    """The entry's model, its drafter, the policy's calibration and the prompt cache, as `settings`
    say; with a cluster (daemon.cluster.launch), rank 0's share of the model. Runs on the engine thread."""
    from daemon.engine.calibration import shared_estimates
    from daemon.models.loading import describe, load

    lm = load(entry.path, drafter=entry.drafter, drafter_bits=entry.drafter_bits, lazy=cluster is not None)
    lm.name = entry.name  # the name requests use, whatever the files call it (a repo's snapshot hash)
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

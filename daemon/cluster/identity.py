"""Whether every rank loaded the same model and drafter: a fingerprint of their files, compared
over the group before any forward."""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import mlx.core as mx

from daemon.models.loading import DEFAULT_DRAFTER, default_model_path

SAMPLE = 1 << 20  # bytes read from each end of a file: a changed checkpoint differs there (headers, sizes)


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def fingerprint(model: str | None, drafter: str | None, split: str, size: int) -> bytes:
    """SHA-256 over the split, mtpd's version, and each model and drafter file's name, size and ends."""
    h = hashlib.sha256(f"{split}|{size}|{importlib.metadata.version('mtpd')}|{drafter}".encode())
    paths = [default_model_path() if model is None else Path(model)]
    if drafter not in ("none", "random"):
        paths += [Path(drafter)] if drafter is not None else [DEFAULT_DRAFTER] if model is None else []
    for path in paths:
        for f in _files(path):
            n = f.stat().st_size
            with f.open("rb") as fh:
                head = fh.read(SAMPLE)
                fh.seek(max(n - SAMPLE, 0))
                ends = head + fh.read(SAMPLE)
            h.update(f"{f.name}|{n}|".encode() + hashlib.sha256(ends).digest())
    return h.digest()


def verify(group, digest: bytes, hosts: list[str]) -> None:
    """Every rank's fingerprint against rank 0's (every rank calls it); raises on a mismatch."""
    mine = mx.array(list(digest), dtype=mx.int32)
    every = mx.distributed.all_gather(mine, group=group).reshape(group.size(), -1).tolist()
    for rank, theirs in enumerate(every):
        if theirs != every[0]:
            raise ValueError(f"rank {rank} ({hosts[rank]}) loaded another model or drafter than rank 0 "
                             f"(fingerprint {bytes(theirs).hex()[:12]} vs {bytes(every[0]).hex()[:12]}): "
                             "every host needs the same --model and --drafter files and mtpd version")

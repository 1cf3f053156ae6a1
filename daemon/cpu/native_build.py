"""C sources of daemon.cpu built into shared libraries with the system's C compiler, once per
source and flags, into mtpd's cache (daemon.cpu.blas names the folder)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


HEADERS = ("lanes.h",)  # what the sources include, built beside them


def library(folder: Path, source_name: str, flags: str, name: str) -> str | None:
    """The shared library of daemon/cpu/`source_name` in `folder` (built there if missing), or None
    where it cannot be built (no C compiler, a failed build)."""
    here = resources.files("daemon.cpu")
    source = here.joinpath(source_name).read_bytes()
    headers = {h: here.joinpath(h).read_bytes() for h in HEADERS}
    digest = hashlib.sha256(source + b"".join(headers.values()) + flags.encode()).hexdigest()[:16]
    target = folder / f"mtpd-{name}-{digest}.so"
    if target.exists():
        return str(target)
    compiler = _compiler()
    if compiler is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as work:
        src, out = Path(work) / source_name, Path(work) / target.name
        src.write_bytes(source)
        for header, text in headers.items():
            (Path(work) / header).write_bytes(text)
        built = subprocess.run([compiler, *flags.split(), str(src), "-o", str(out), "-ldl", "-lpthread"],
                               capture_output=True, timeout=120)
        if built.returncode != 0:
            return None
        os.replace(out, target)  # atomic: processes building at once each install a whole file
    return str(target)

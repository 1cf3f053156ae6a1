"""One-row products as matrix-vector products, under MLX's CPU backend.

MLX calls `cblas_sgemm` for every fp32 matmul. A one-row input (a plain decode step, a drafter
call) is a matrix-vector product, which is bound by reading the weights, and OpenBLAS's packed
matrix kernel reads them at about half the speed of its `sgemv`: measured on a 2-vCPU AMD EPYC with
Debian's OpenBLAS 0.3.21, 30 of the default model's gate/up matrices in 16 ms one row at a time
through `sgemm`, 10 ms through `sgemv`; the whole one-row forward 52 -> 39 ms (docs/cpu.md).

`gemv.c` is a `cblas_sgemm` preloaded ahead of the BLAS (daemon.cpu.blas) that sends those products
to the BLAS's own `cblas_sgemv` and everything else to its `cblas_sgemm`. It is compiled here, once
per source, with the system's C compiler into mtpd's cache; with no compiler there is no shim and
nothing changes. Whether it is faster on this machine is measured at load (daemon.cpu.forms) and
`enable` turns it off where it is not.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

SOURCE = "gemv.c"


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


def library(folder: Path) -> str | None:
    """The shim's shared library in `folder` (built there if missing), or None where it cannot be
    built (no C compiler, a failed build)."""
    source = resources.files("daemon.cpu").joinpath(SOURCE).read_bytes()
    target = folder / f"mtpd-gemv-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if target.exists():
        return str(target)
    compiler = _compiler()
    if compiler is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as work:
        src, out = Path(work) / SOURCE, Path(work) / target.name
        src.write_bytes(source)
        built = subprocess.run([compiler, "-O2", "-shared", "-fPIC", str(src), "-o", str(out), "-ldl"],
                               capture_output=True, timeout=120)
        if built.returncode != 0:
            return None
        os.replace(out, target)  # atomic: processes building at once each install a whole file
    return str(target)


def _switch():
    return getattr(ctypes.CDLL(None), "mtpd_gemv_enable", None)


def loaded() -> bool:
    """Whether this process runs with the shim preloaded."""
    return _switch() is not None


def enable(on: bool) -> None:
    """One-row products through `sgemv` (on) or the BLAS's `sgemm` (off); nothing where no shim is loaded."""
    switch = _switch()
    if switch is not None:
        switch(ctypes.c_int(int(on)))


def enabled() -> bool:
    state = getattr(ctypes.CDLL(None), "mtpd_gemv_enabled", None)
    return bool(state()) if state is not None else False


@contextlib.contextmanager
def disabled():
    """The BLAS's own `sgemm` for everything inside (mlx-lm's loop as its users run it)."""
    was = enabled()
    enable(False)
    try:
        yield
    finally:
        enable(was)

"""Put an optimised BLAS under MLX's CPU backend, without the user typing LD_PRELOAD.

MLX's Linux wheel bundles a reference BLAS; Debian's OpenBLAS is ~30x faster for fp32 matmul
and ~2x end to end for decode. The process re-executes itself once with the library preloaded.
On macOS MLX uses Metal and Accelerate and nothing is done.
"""

from __future__ import annotations

import glob
import os
import sys

_CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/openblas-pthread/libblas.so.3",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
)
_MARK = "MTPD_BLAS_REEXEC"


def find_openblas() -> str | None:
    for pattern in _CANDIDATES:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def reexec_with_blas(command: list[str]) -> None:
    """Replace this process by `command` with OpenBLAS preloaded, when that helps and is possible.

    Returns normally (and does nothing) on macOS, when already preloaded, when the user opted out
    with MTPD_BLAS=reference, or when no OpenBLAS is installed.
    """
    if not sys.platform.startswith("linux") or os.environ.get(_MARK):
        return
    if os.environ.get("MTPD_BLAS", "").lower() == "reference":
        return
    library = find_openblas()
    if library is None or library in os.environ.get("LD_PRELOAD", ""):
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD")) if p)
    env[_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *command], env)


def blas_in_use() -> str:
    """A human-readable name of the BLAS MLX runs on in this process."""
    if sys.platform == "darwin":
        return "Accelerate / Metal"
    library = find_openblas()
    if library is not None:
        real = os.path.realpath(library)
        with open("/proc/self/maps", encoding="utf-8") as maps:
            if any(line.rstrip().endswith(real) for line in maps):
                return f"OpenBLAS ({real})"
    return "MLX bundled reference BLAS (slow: install libopenblas0-pthread)"

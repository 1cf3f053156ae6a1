"""Put an optimised BLAS under MLX's CPU backend, without the user typing LD_PRELOAD.

MLX's Linux wheel bundles a reference BLAS. Intel's MKL (the `mkl` wheel, installed with mtpd on
Linux x86_64) and Debian's OpenBLAS are both ~30x faster for fp32 matmul; MKL also runs the
few-row products of decoding and verification faster on an Intel CPU (plain decode of the default
model ~1.5x OpenBLAS's on a 2-core Xeon), while on an AMD EPYC OpenBLAS is the faster of the two.
The process re-executes itself once with the chosen library preloaded, and ahead of it
daemon.cpu.few_rows's shim for few-row products where a C compiler can build it, and with MLX's
CPU kernels built for this CPU (daemon.cpu.native_jit). On macOS MLX uses Metal and Accelerate and
nothing is done.

MTPD_BLAS picks one: `mkl`, `openblas`, `reference` (MLX's own), or unset (on an Intel CPU MKL, else
OpenBLAS; on others the reverse).
"""

from __future__ import annotations

import glob
import os
import site
import sys
import sysconfig
from pathlib import Path

_CANDIDATES = {
    # where pip puts the `mkl` wheel's libraries: the environment, the scheme's data dir, --user
    "mkl": tuple(
        dict.fromkeys(
            os.path.join(base, "lib", "libmkl_rt.so.*")
            for base in (sys.prefix, sysconfig.get_path("data"), site.USER_BASE)
            if base
        )
    ),
    "openblas": (
        "/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3",
        "/usr/lib64/openblas-pthread/libblas.so.3",
        "/usr/lib/*-linux-gnu/libopenblas.so.0",
    ),
}
_NAMES = {"mkl": "Intel MKL", "openblas": "OpenBLAS"}
_MARK = "MTPD_BLAS_REEXEC"
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")  # read when the BLAS loads


def choice() -> str:
    """MTPD_BLAS, checked: `mkl`, `openblas`, `reference` or `auto` (unset)."""
    wanted = os.environ.get("MTPD_BLAS", "").strip().lower() or "auto"
    if wanted not in ("auto", "reference", *_CANDIDATES):
        raise ValueError(f"MTPD_BLAS={wanted!r}: expected mkl, openblas or reference")
    return wanted


def find(kind: str) -> str | None:
    """The installed library of one kind (`mkl` or `openblas`), or None."""
    for pattern in _CANDIDATES[kind]:
        found = sorted(glob.glob(pattern))
        if found:
            return found[-1]
    return None


def intel_cpu() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return "GenuineIntel" in cpuinfo.read(4096)
    except OSError:
        return False


def find_blas() -> str | None:
    """The library to preload under MTPD_BLAS, or None (reference BLAS). Unset: MKL first on an
    Intel CPU, OpenBLAS first on others (both measured, on a Xeon and on an AMD EPYC: docs/cpu.md)."""
    wanted = choice()
    if wanted == "reference":
        return None
    if wanted == "auto":
        kinds = ("mkl", "openblas") if intel_cpu() else ("openblas", "mkl")
    else:
        kinds = (wanted,)
    return next((lib for lib in map(find, kinds) if lib is not None), None)


def reexec_with_blas(command: list[str]) -> None:
    """Replace this process by `command` with the chosen BLAS preloaded, when that helps and is
    possible.

    Returns normally (and does nothing) on macOS, when already preloaded, when the user opted out
    with MTPD_BLAS=reference, or when no optimised BLAS is installed.
    """
    if not sys.platform.startswith("linux") or os.environ.get(_MARK):
        return
    library = find_blas()
    if library is None or library in os.environ.get("LD_PRELOAD", ""):
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (_shim(), library, env.get("LD_PRELOAD")) if p)
    env.update(_native_jit(env))
    env[_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *command], env)


def native_folder() -> Path:
    """Where what mtpd builds for this machine lives: the shim, MLX's kernels."""
    from daemon.settings import default_cache_dir

    return default_cache_dir() / "native"


def _shim() -> str | None:
    """daemon.cpu.few_rows's products, preloaded ahead of the BLAS where it can be built."""
    from daemon.cpu import few_rows

    try:
        return few_rows.library(native_folder())
    except OSError:  # an unwritable cache, a compiler that cannot run
        return None


def _native_jit(env: dict[str, str]) -> dict[str, str]:
    """MLX's CPU kernels built for this CPU (daemon.cpu.native_jit), where it has a g++."""
    from daemon.cpu import native_jit

    return native_jit.environment(native_folder(), env)


def blas_in_use() -> str:
    """A human-readable name of the BLAS MLX runs on in this process (the first preloaded wins)."""
    from daemon.cpu import few_rows

    if sys.platform == "darwin":
        return "Accelerate / Metal"
    with open("/proc/self/maps", encoding="utf-8") as maps:
        mapped = maps.read()
    known = {os.path.realpath(lib): _NAMES[kind] for kind in _NAMES if (lib := find(kind))}
    for path in (os.path.realpath(p) for p in os.environ.get("LD_PRELOAD", "").split(":") if p):
        if path in known and path in mapped:
            return f"{known[path]} ({path})" + (", with mtpd's few-row products" if few_rows.loaded() else "")
    return "MLX bundled reference BLAS (slow: install mtpd's Linux dependencies, see install.sh)"


def set_threads(n: int) -> bool:
    """Caps the preloaded BLAS at `n` threads from now on (several ranks sharing a machine's
    cores: busy-waiting BLAS threads would take each other's). False where none can be told."""
    import ctypes

    symbols = ctypes.CDLL(None)  # the preloaded library's functions are global
    for name in ("openblas_set_num_threads", "MKL_Set_Num_Threads"):
        setter = getattr(symbols, name, None)
        if setter is not None:
            setter(ctypes.c_int(n))
            return True
    return False

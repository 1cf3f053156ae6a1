"""Few-row products under MLX's CPU backend: a decode step's, a verification's, a drafter call's.

MLX calls `cblas_sgemm` for every fp32 matmul. A product of a few rows with a weight matrix is
bound by reading the weights (and, from a few rows, by the multiply-adds), and OpenBLAS's packed
kernel reads them at about half the speed the memory allows: on a 2-vCPU AMD EPYC with Debian's
OpenBLAS 0.3.21, every matrix of the default model's 30 blocks took 29 / 38 / 41 ms for 1 / 4 / 8
rows through its `sgemm`, 15 / 19 / 33 ms through `few_rows.c`, which reads each weight row once for
up to 8 input rows (docs/cpu.md).

`few_rows.c` is a `cblas_sgemm` preloaded ahead of the BLAS (daemon.cpu.blas) that computes
products of up to 24 rows against a large weight matrix itself and hands everything else to the
BLAS's `cblas_sgemm`. It is compiled here, once per source, with the system's C compiler into
mtpd's cache; with no compiler there is no shim and nothing changes. Whether it is faster on this
machine is measured at load (daemon.cpu.forms) and `enable` turns it off where it is not.
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path

from daemon.cpu import native_build

SOURCE = "few_rows.c"
# no -ffast-math or -fassociative-math: the kernel is vectorised by hand, and each output's order of
# operations must not depend on how many rows are computed beside it
FLAGS = "-O3 -shared -fPIC"


def library(folder: Path) -> str | None:
    """The shim's shared library in `folder` (built there if missing), or None where it cannot be
    built (no C compiler, a failed build)."""
    return native_build.library(folder, SOURCE, FLAGS, "few-rows")


def _shim(name: str):
    """The preloaded shim's function `name`, or None where no shim is loaded."""
    return getattr(ctypes.CDLL(None), f"mtpd_few_rows_{name}", None)


def loaded() -> bool:
    """Whether this process runs with the shim preloaded."""
    return _shim("enable") is not None


def enable(on: bool) -> None:
    """Few-row products by the shim (on) or the BLAS's `sgemm` (off); nothing where no shim is loaded."""
    switch = _shim("enable")
    if switch is not None:
        switch(ctypes.c_int(int(on)))


def enabled() -> bool:
    state = _shim("enabled")
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

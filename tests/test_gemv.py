"""daemon.cpu.gemv: the preloaded cblas_sgemm that sends one-row products to sgemv computes what
the BLAS's own does, for every layout MLX can hand it, and only where it is switched on."""

import subprocess
import sys
import textwrap

import pytest

from daemon.cpu import blas, gemv

OPENBLAS = blas.find("openblas") if sys.platform.startswith("linux") else None
needs_shim = pytest.mark.skipif(OPENBLAS is None or gemv._compiler() is None, reason="Linux, OpenBLAS and a C compiler")

PRODUCTS = textwrap.dedent("""
    import json, sys
    import mlx.core as mx, numpy as np
    from daemon.cpu import gemv

    def products():
        out = []
        for rows in (1, 3):
            for k, n in ((64, 96), (7, 1), (1, 5)):
                a = mx.random.normal((rows, k), key=mx.random.key(k + n))
                b = mx.random.normal((k, n), key=mx.random.key(n))
                at = mx.contiguous(a.T).T  # stored transposed: MLX passes it with its stride
                bt = mx.contiguous(b.T).T
                wide = mx.random.normal((4, k), key=mx.random.key(3))[1:2]  # one row of a taller matrix
                for x, y in ((a, b), (at, b), (a, bt), (at, bt)) + (((wide, b), (wide, bt)) if rows == 1 else ()):
                    got = np.array(x @ y)
                    want = np.array(x).astype(np.float64) @ np.array(y).astype(np.float64)
                    out.append(float(np.abs(got - want).max() / (np.abs(want).max() + 1e-9)))
        return out

    on = products()
    gemv.enable(False)
    print(json.dumps({"loaded": gemv.loaded(), "on": on, "off": products(), "enabled": gemv.enabled()}))
""")


@needs_shim
def test_one_row_products_match_the_blas(tmp_path):
    shim = gemv.library(tmp_path)
    run = subprocess.run([sys.executable, "-c", PRODUCTS], capture_output=True, text=True, timeout=120,
                         env={"LD_PRELOAD": f"{shim}:{OPENBLAS}", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    import json

    seen = json.loads(run.stdout)
    assert seen["loaded"] is True and seen["enabled"] is False
    assert len(seen["on"]) == len(seen["off"]) == 30
    assert max(seen["on"]) < 1e-5 and max(seen["off"]) < 1e-5


@needs_shim
def test_the_shim_is_built_once_per_source(tmp_path):
    first = gemv.library(tmp_path)
    assert first is not None and first.startswith(str(tmp_path))
    stamp = (tmp_path / first.rsplit("/", 1)[1]).stat().st_mtime_ns
    assert gemv.library(tmp_path) == first
    assert (tmp_path / first.rsplit("/", 1)[1]).stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.rsplit("/", 1)[1]]  # no build leftovers


def test_no_compiler_means_no_shim(tmp_path, monkeypatch):
    monkeypatch.setattr(gemv, "_compiler", lambda: None)
    assert gemv.library(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_without_the_shim_nothing_changes():
    assert gemv.loaded() is False  # pytest's own process runs without preloads
    gemv.enable(True)
    assert gemv.enabled() is False
    with gemv.disabled():
        assert gemv.enabled() is False

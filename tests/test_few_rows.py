"""daemon.cpu.few_rows: the preloaded cblas_sgemm computes what the BLAS's own does for every layout
MLX can hand it, computes each row the same whatever rows are beside it, and steps aside when off."""

import json
import subprocess
import sys
import textwrap

import pytest

from daemon.cpu import blas, few_rows, native_build

OPENBLAS = blas.find("openblas") if sys.platform.startswith("linux") else None
needs_shim = pytest.mark.skipif(OPENBLAS is None or native_build._compiler() is None,
                                reason="Linux, OpenBLAS and a C compiler")

PRODUCTS = textwrap.dedent("""
    import ctypes, json, os, signal, time
    import mlx.core as mx, numpy as np
    from daemon.cpu import few_rows

    def products():
        errors, alone = [], []
        for rows in (1, 2, 5, 8, 9, 16, 24, 25):  # one group of rows, two, three, and one row too many
            for k, n in ((576, 192), (1536, 64), (300, 257), (64, 96)):  # the shim's (rows long enough to
                # be grouped by fours), odd sizes, too small for it
                a = mx.random.normal((rows, k), key=mx.random.key(k + n))
                w = mx.random.normal((n, k), key=mx.random.key(n))
                at = mx.contiguous(a.T).T  # stored transposed: MLX passes it with its stride
                wide = mx.random.normal((rows, k + 5), key=mx.random.key(3))[:, 2 : 2 + k]  # rows apart
                for x, y in ((a, w.T), (at, w.T), (a, mx.contiguous(w.T)), (wide, w.T)):
                    got = np.array(x @ y)
                    want = np.array(x).astype(np.float64) @ np.array(y).astype(np.float64)
                    errors.append(float(np.abs(got - want).max() / np.abs(want).max()))
                one = np.concatenate([np.array(a[r : r + 1] @ w.T) for r in range(rows)])
                alone.append(bool((one == np.array(a @ w.T)).all()))
        return errors, alone

    on, alone_on = products()
    sgemm = ctypes.CDLL(None).cblas_sgemm  # the shim's, called straight: MLX itself does not survive a fork

    def product(x, w):  # x @ w.T, row-major
        c = np.zeros((x.shape[0], w.shape[0]), np.float32)
        f, i = ctypes.c_float, ctypes.c_int
        sgemm(i(101), i(111), i(112), i(x.shape[0]), i(w.shape[0]), i(x.shape[1]), f(1.0),
              x.ctypes.data_as(ctypes.c_void_p), i(x.shape[1]), w.ctypes.data_as(ctypes.c_void_p), i(w.shape[1]),
              f(0.0), c.ctypes.data_as(ctypes.c_void_p), i(w.shape[0]))
        return c

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 512), np.float32), rng.standard_normal((512, 512), np.float32)
    want = product(x, w)
    time.sleep(0.05)  # the parent's helper has stopped spinning and waits on its condition variable
    child = os.fork()  # a child starts its own helper thread: the parent's is not there
    if child == 0:
        signal.alarm(20)  # a hang fails the test instead of stalling it
        first = product(x, w)
        time.sleep(0.05)  # the child's helper now waits on the condition variable too, and is woken
        os._exit(0 if (first == want).all() and (product(x[:1], w) == want[:1]).all() else 1)
    forked = os.waitpid(child, 0)[1]
    few_rows.enable(False)
    off, _ = products()
    print(json.dumps({"loaded": few_rows.loaded(), "on": on, "off": off, "alone_on": alone_on,
                      "enabled": few_rows.enabled(), "forked": forked}))
""")


@needs_shim
def test_few_row_products_match_the_blas_each_row_stands_alone_and_a_fork_works(tmp_path):
    shim = few_rows.library(tmp_path)
    run = subprocess.run([sys.executable, "-c", PRODUCTS], capture_output=True, text=True, timeout=120,
                         env={"LD_PRELOAD": f"{shim}:{OPENBLAS}", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen["loaded"] is True and seen["enabled"] is False and seen["forked"] == 0
    assert len(seen["on"]) == len(seen["off"]) == 128
    assert max(seen["on"]) < 1e-5 and max(seen["off"]) < 1e-5
    # the shim's products (up to 24 rows, large enough) give each row exactly as it comes alone
    mine = [seen["alone_on"][4 * i + shape] for i in range(7) for shape in (0, 1, 2)]  # 1 to 24 rows
    assert mine == [True] * 21


@needs_shim
def test_the_shim_is_built_once_per_source(tmp_path):
    first = few_rows.library(tmp_path)
    assert first is not None and first.startswith(str(tmp_path))
    name = first.rsplit("/", 1)[1]
    stamp = (tmp_path / name).stat().st_mtime_ns
    assert few_rows.library(tmp_path) == first
    assert (tmp_path / name).stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no build leftovers


def test_no_compiler_means_no_shim(tmp_path, monkeypatch):
    monkeypatch.setattr(native_build, "_compiler", lambda: None)
    assert few_rows.library(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_without_the_shim_nothing_changes():
    assert few_rows.loaded() is False  # pytest's own process runs without preloads
    few_rows.enable(True)
    assert few_rows.enabled() is False
    with few_rows.disabled():
        assert few_rows.enabled() is False

"""Which BLAS mtpd preloads under MLX's CPU backend, and that the log names it."""

import platform
import sys

import pytest
from conftest import run_mtpd

from daemon.cpu import blas

LINUX = sys.platform.startswith("linux")
EXPECTED_BLAS = (
    "Accelerate / Metal" if sys.platform == "darwin"
    else "Intel MKL" if platform.machine() == "x86_64" and blas.intel_cpu()  # the `mkl` wheel is a dependency
    else "OpenBLAS"
)


@pytest.fixture
def libraries(tmp_path, monkeypatch):
    mkl, openblas = tmp_path / "libmkl_rt.so.3", tmp_path / "libblas.so.3"
    monkeypatch.setattr(blas, "_CANDIDATES", {"mkl": (str(mkl),), "openblas": (str(openblas),)})
    return mkl, openblas


@pytest.mark.parametrize(
    ("setting", "intel", "present", "chosen"),
    [
        ("", True, ("mkl", "openblas"), "mkl"),
        ("", False, ("mkl", "openblas"), "openblas"),
        ("", False, ("mkl",), "mkl"),
        ("", True, ("openblas",), "openblas"),
        ("", True, (), None),
        ("openblas", True, ("mkl", "openblas"), "openblas"),
        ("MKL", False, ("mkl", "openblas"), "mkl"),
        ("mkl", True, ("openblas",), None),
        ("reference", True, ("mkl", "openblas"), None),
    ],
)
def test_choice_of_library(libraries, monkeypatch, setting, intel, present, chosen):
    files = dict(zip(("mkl", "openblas"), libraries))
    for kind in present:
        files[kind].write_bytes(b"")
    monkeypatch.setenv("MTPD_BLAS", setting)
    monkeypatch.setattr(blas, "intel_cpu", lambda: intel)
    assert blas.find_blas() == (str(files[chosen]) if chosen else None)


def test_unknown_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("MTPD_BLAS", "atlas")
    with pytest.raises(ValueError, match="MTPD_BLAS='atlas'"):
        blas.find_blas()


@pytest.mark.skipif(not LINUX, reason="the preload is Linux-only")
@pytest.mark.parametrize(
    ("setting", "named"), [(None, EXPECTED_BLAS), ("openblas", "OpenBLAS"), ("reference", "reference BLAS")]
)
def test_the_command_line_preloads_and_names_it(tiny_gguf, setting, named):
    env = {"MTPD_BLAS": setting} if setting else {}
    done = run_mtpd("generate", "--model", str(tiny_gguf), "--drafter", "none", "--max-tokens", "2", "hi", env=env)
    assert done.returncode == 0, done.stderr
    assert named in done.stderr


def test_the_command_line_rejects_an_unknown_blas(tiny_gguf):
    done = run_mtpd("generate", "--model", str(tiny_gguf), "hi", env={"MTPD_BLAS": "atlas"})
    assert done.returncode == 2
    assert "mtpd: error: MTPD_BLAS='atlas': expected mkl, openblas or reference" in done.stderr

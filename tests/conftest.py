import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    tiny.write_gguf(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm(tiny_gguf):
    from daemon.models import load

    return load(str(tiny_gguf))


def run_mtpd(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The installed command line, as a user runs it (it applies OpenBLAS itself)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MTPD_BLAS_REEXEC",)}
    env["MTPD_CACHE_DIR"] = tempfile.mkdtemp(prefix="mtpd-test-")  # never the user's calibration
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args], capture_output=True, text=True, timeout=timeout, env=env
    )

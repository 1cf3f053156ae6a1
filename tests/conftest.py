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
    from daemon.models.loading import load

    return load(str(tiny_gguf))


def run_mtpd(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed command line, as a user runs it (it preloads its BLAS itself)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MTPD_BLAS_REEXEC",)} | (env or {})
    env["MTPD_CACHE_DIR"] = tempfile.mkdtemp(prefix="mtpd-test-")  # never the user's calibration
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def until(condition, timeout: float = 60.0):
    """Polls `condition()` until it is truthy; returns its value."""
    import time

    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
    return value


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """`mtpd serve` in a subprocess on loopback, as a user starts it; its settings come from
    flags and MTPD_* variables only (never the user's config file or cache)."""

    def __init__(self, *args: str, env: dict | None = None, cache_dir: Path | None = None):
        import time
        import urllib.request

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cache_dir = cache_dir or Path(tempfile.mkdtemp(prefix="mtpd-cache-"))
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MTPD_")}
        full_env.update(MTPD_CACHE_DIR=str(self.cache_dir), XDG_CONFIG_HOME=tempfile.mkdtemp(prefix="mtpd-config-"))
        full_env.update(env or {})
        self.log_path = Path(tempfile.mkstemp(prefix="mtpd-log-", suffix=".jsonl")[1])
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "serve", "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mtpd serve exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mtpd serve did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def log_records(self) -> list[dict]:
        import json

        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def stop(self, sig: int = 15, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._log.close()
        return code


@pytest.fixture(scope="module")
def tiny_daemon(tiny_gguf):
    daemon = Daemon("--model", str(tiny_gguf), "--drafter", "random", env={"MTPD_MAX_QUEUE": "64"})
    yield daemon
    assert daemon.stop() == 0, daemon.log()


@pytest.fixture(scope="session")
def default_daemon():
    """`mtpd serve` on the default model, shared: answers are 2 tokens unless a request says more
    (for the fuzz test), and nothing is written to disk but the calibration."""
    daemon = Daemon(env={"MTPD_DEFAULT_MAX_TOKENS": "2", "MTPD_REQUEST_TIMEOUT_S": "60", "MTPD_PROMPT_CACHE_DISK_BYTES": "0"})
    yield daemon
    assert daemon.stop() == 0, daemon.log()

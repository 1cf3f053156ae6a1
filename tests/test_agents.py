"""Coding agents as their users run them, headless, against `mtpd serve` on the default model:
Claude Code (npm @anthropic-ai/claude-code) slim, for two turns, and as installed; Codex (npm
@openai/codex) through the Responses API, slimmed to fit the model's 8,192-token context. Both
are installed by `./install.sh --test` under .venv/. Answers are capped (`max_tokens_limit`) so a
small model's ramble cannot outlast the test: agents ask for 32,000 tokens a turn."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import Daemon

pytestmark = pytest.mark.real_model

CLIENTS = Path(__file__).parents[1] / ".venv"
CLAUDE = CLIENTS / "claude" / "node_modules" / ".bin" / "claude"
CODEX = CLIENTS / "codex" / "node_modules" / ".bin" / "codex"
MODEL = "SmolLM2-135M-Instruct"
SYSTEM = "You are a coding assistant. Edit files with the Edit tool. Be brief."
TASK = "Add a function sub(a, b) to calc.py"


@pytest.fixture(scope="module")
def daemon():
    served = Daemon(env={"MTPD_MAX_TOKENS_LIMIT": "160", "MTPD_REQUEST_TIMEOUT_S": "600",
                         "MTPD_PROMPT_CACHE_DISK_BYTES": "0"})
    yield served
    assert served.stop() == 0, served.log()


def project(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    return work


def requests_since(daemon: Daemon, seen: int) -> list[dict]:
    return [r for r in daemon.log_records() if r.get("event") == "request"][seen:]


def claude(daemon: Daemon, work: Path, home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "ANTHROPIC_BASE_URL": daemon.url, "ANTHROPIC_API_KEY": "none",
           "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    return subprocess.run([str(CLAUDE), "-p", *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)

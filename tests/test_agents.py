"""Coding agents as their users run them, headless, against `mtpd serve` on the default model:
Claude Code (npm @anthropic-ai/claude-code) slim, for two turns, and as installed; Codex (npm
@openai/codex) through the Responses API, slimmed to fit the model's 8,192-token context. Both
are installed by `./install.sh --test` under .venv/. The daemon is set as a user of a small model
behind an agent would set it: greedy when a request names no temperature (neither agent sends
one; at 1 a 135M model rambles until its answer is cut, which Claude Code takes for a truncated
turn), and answers capped by `max_tokens_limit` (agents ask for 32,000 tokens a turn)."""

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
    served = Daemon(env={"MTPD_DEFAULT_TEMPERATURE": "0", "MTPD_MAX_TOKENS_LIMIT": "256", "MTPD_REQUEST_TIMEOUT_S": "600",
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


def codex_home(tmp_path: Path, url: str) -> Path:
    """Codex slimmed to fit 8,192 tokens (~2,500 a request instead of ~10,000): short instructions, no
    sub-agent, goal, image or hosted web-search tools; mtpd as its Responses provider."""
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "instructions.md").write_text("You are a coding agent. Use exec_command to run shell commands. Be brief.\n")
    (home / "config.toml").write_text(
        f'model = "{MODEL}"\nmodel_provider = "mtpd"\nmodel_instructions_file = "{home / "instructions.md"}"\n'
        'web_search = "disabled"\n[features]\nmulti_agent = false\ngoals = false\nview_image = false\n'
        f'[model_providers.mtpd]\nname = "mtpd"\nbase_url = "{url}/v1"\nwire_api = "responses"\n')
    return home


def test_claude_code_slim_answers_two_turns_the_second_from_the_cache(daemon, tmp_path):
    work, home = project(tmp_path), tmp_path / "home"
    home.mkdir()
    seen = len(requests_since(daemon, 0))
    first = claude(daemon, work, home, "--bare", "--tools", "Read,Edit", "--system-prompt", SYSTEM, TASK)
    assert first.returncode == 0, first.stdout + first.stderr
    turn1 = requests_since(daemon, seen)
    second = claude(daemon, work, home, "--bare", "--continue", "--tools", "Read,Edit", "--system-prompt", SYSTEM,
                    "Now add mul(a, b) too")
    assert second.returncode == 0, second.stdout + second.stderr
    turn2 = requests_since(daemon, seen + len(turn1))
    assert turn1 and turn2 and all(r["endpoint"] == "messages" and r["status"] == "ok" for r in turn1 + turn2)
    # the second turn's first prompt is the first turn's last one, its answer and the new message
    assert turn2[0]["cached_tokens"] >= 0.9 * turn2[0]["prompt_tokens"], turn2[0]
    assert "model" in turn1[0]["unused_hints"] and "output_config.effort" in turn1[0]["unused_hints"]


def test_claude_code_as_installed_gets_the_context_error_it_knows(daemon, tmp_path):
    """21 tools and a ~21,000-token prompt against an 8,192-token context: Anthropic's own wording,
    which Claude Code explains, at once (nothing is generated)."""
    work, home = project(tmp_path), tmp_path / "home"
    home.mkdir()
    seen = len(requests_since(daemon, 0))
    run = claude(daemon, work, home, TASK, timeout=120)
    assert run.returncode == 1 and "Prompt is too long" in run.stdout + run.stderr, run.stdout + run.stderr
    assert requests_since(daemon, seen) == []  # refused before the engine


def test_codex_exec_completes_a_turn_over_the_responses_api(daemon, tmp_path):
    work = project(tmp_path)
    seen = len(requests_since(daemon, 0))
    run = subprocess.run([str(CODEX), "exec", "--skip-git-repo-check", TASK], cwd=work, capture_output=True, text=True,
                         env={**os.environ, "CODEX_HOME": str(codex_home(tmp_path, daemon.url))}, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    turn = requests_since(daemon, seen)
    assert turn and all(r["endpoint"] == "responses" and r["status"] == "ok" for r in turn), turn
    assert all(r["prompt_tokens"] < 4000 for r in turn)  # slimmed: the instructions and tools Codex sends fit


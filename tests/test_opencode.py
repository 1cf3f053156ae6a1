"""A real coding agent against the daemon on the default model: `opencode run` (npm's opencode-ai,
installed by `./install.sh --test`) with an OpenAI-compatible provider and a `small_model`, a second
model of the daemon's (the default GGUF under another name, loaded on its first request). The
session title goes to the small model while the agent's turn, with its tools, goes to the large
one, both answered together (the engine steps each model's batch in turn); the turn must be
answered, and it must finish without a client error. The default model's 8,192-token context holds
Open Code's prompt with its core tools; the four it needs least (task, todowrite, webfetch, skill)
are switched off to leave room for a tool-result turn, as a user of a small local model would."""

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest
from conftest import Daemon

from daemon.models.loading import default_model_path

pytestmark = pytest.mark.real_model

OPENCODE = Path(__file__).parents[1] / ".venv" / "opencode" / "node_modules" / ".bin" / "opencode"
MODEL = "SmolLM2-135M-Instruct"
SMALL = "smol-title"


def config(url: str) -> dict:
    return {
        "$schema": "https://opencode.ai/config.json",
        "provider": {"mtpd": {"npm": "@ai-sdk/openai-compatible", "name": "mtpd", "options": {"baseURL": url + "/v1"},
                              "models": {MODEL: {"name": "SmolLM2", "limit": {"context": 8192, "output": 384}},
                                         SMALL: {"name": "titles", "limit": {"context": 8192, "output": 64}}}}},
        "model": f"mtpd/{MODEL}",
        "small_model": f"mtpd/{SMALL}",
        "tools": {"task": False, "todowrite": False, "webfetch": False, "skill": False},
    }


def test_opencode_run_is_answered_without_a_client_error(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    small = {SMALL: {"path": str(default_model_path()), "speculation": "off"}}
    daemon = Daemon(env={"MTPD_LOG_PROMPTS": "true", "MTPD_REQUEST_TIMEOUT_S": "600", "MTPD_MODELS": json.dumps(small)})
    try:
        (work / "opencode.json").write_text(json.dumps(config(daemon.url)))
        env = {**os.environ, **{f"XDG_{d}_HOME": str(tmp_path / d.lower()) for d in ("DATA", "CONFIG", "CACHE", "STATE")},
               "PWD": str(work)}  # Open Code takes its project from PWD, not from the process's directory
        run = subprocess.run([str(OPENCODE), "run", "--print-logs", "Add a function sub(a, b) to calc.py"], cwd=work,
                             env=env, capture_output=True, text=True, timeout=900)
        metrics = urllib.request.urlopen(daemon.url + "/metrics", timeout=10).read().decode()
    finally:
        assert daemon.stop() == 0
    logs = run.stdout + run.stderr
    # its model catalogue lives on models.dev, out of reach here: that one error is not about mtpd
    errors = [line for line in logs.splitlines() if "level=ERROR" in line and "models.dev" not in line]
    assert run.returncode == 0 and not errors, logs[-4000:]
    requests = [r for r in daemon.log_records() if r.get("event") == "request"]
    agent = [r for r in requests if "<tools>" in r["prompt"]]
    title = [r for r in requests if "<tools>" not in r["prompt"]]
    assert len(requests) >= 2 and agent and title and all(r["status"] == "ok" for r in agent), requests
    assert {r["model"] for r in agent} == {MODEL} and {r["model"] for r in title} == {SMALL}
    print("\n".join(json.dumps({k: r.get(k) for k in ("model", "endpoint", "status", "prompt_tokens",
                                                      "completion_tokens", "speculation")}) for r in requests))
    # the title runs beside the agent's turn; a weak model's title can outlast the turn, and Open Code,
    # done, drops it: that request ends client_gone, after the turn it did not hold up
    done = max(r["timestamp"] for r in agent)
    assert all(r["status"] == "ok" or (r["status"] == "client_gone" and r["timestamp"] >= done) for r in title), title
    assert f'mtpd_model_loads_total{{model="{SMALL}"}} 1.0' in metrics
    assert agent and all(f'"name": "{tool}"' in agent[0]["prompt"] for tool in ("bash", "edit", "read", "write"))
    assert '"name": "webfetch"' not in agent[0]["prompt"]

"""bench/soak.py for a few seconds against the tiny model: every request kind runs, every request
is answered, memory is sampled and plotted."""

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[1] / "bench" / "soak.py"
KINDS = {"chat", "chat_stream", "completion", "messages", "messages_stream", "tool_call", "json_schema",
         "dropped_stream"}


def test_short_soak_answers_every_kind_and_plots_memory(tmp_path, tiny_gguf):
    out, png = tmp_path / "soak.json", tmp_path / "soak.png"
    done = subprocess.run([sys.executable, str(SOAK), "--minutes", "0.15", "--clients", "3", "--sample", "2",
                           "--json", str(out), "--plot", str(png), "--model", str(tiny_gguf), "--drafter", "random"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    requests = report["requests"]
    assert requests["failed"] == 0 and report["failures"] == []
    assert requests["sent"] == requests["answered"] > 0
    assert set(requests["by_kind"]) == KINDS  # each client ends its round, so every kind ran
    assert all(set(statuses) == {"200"} for statuses in requests["by_kind"].values())
    assert sum(n for statuses in requests["by_kind"].values() for n in statuses.values()) == requests["sent"]
    assert report["idle_after"] and report["daemon_exit"] == 0
    assert report["serve_args"] == ["--model", str(tiny_gguf), "--drafter", "random"]
    samples = report["samples"]
    assert len(samples) >= 3 and all(s["health"] and s["vm_rss"] > 0 for s in samples)
    assert samples[-1]["answered"] == requests["answered"]
    assert report["memory"]["end"]["rss"] == samples[-1]["vm_rss"]
    assert png.stat().st_size > 10_000
    assert "0 failed" in done.stdout and "end / third" in done.stdout

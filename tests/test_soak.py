"""bench/soak.py for a few seconds against the tiny model: every request kind runs, every request
is answered, memory is sampled and plotted."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

BENCH = Path(__file__).resolve().parents[1] / "bench"
SOAK = BENCH / "soak.py"
sys.path.insert(0, str(BENCH))

import soak  # noqa: E402

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
    assert all(s[k] is not None for s in samples for k in soak.HEALTH_MEMORY)  # /health's memory, read
    assert samples[-1]["answered"] == requests["answered"]
    assert report["memory"]["end"]["rss"] == samples[-1]["vm_rss"]
    assert png.stat().st_size > 10_000
    assert "0 failed" in done.stdout and "end / third" in done.stdout


MEMORY = {"rss_bytes": 300 * 2**20, "mlx_active_bytes": 100, "mlx_cache_bytes": 200, "mlx_peak_bytes": 300,
          "prompt_cache_bytes": 400}


async def test_a_sample_reads_health_memory_and_proc(aiohttp_server):
    async def health(_):
        return web.json_response({"running": 1, "waiting": 0, "memory": MEMORY})

    app = web.Application()
    app.router.add_get("/health", health)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as http:
        c = soak.Clients(str(server.make_url("")).rstrip("/"), "m", None, None, http)
        tally = soak.Tally(time.monotonic())
        tally.record("chat", 200)
        tally.record("chat", 503, "busy")
        bare = await soak.sample(c, None, tally)  # no pid: as on macOS, RSS from /health
        own = await soak.sample(c, os.getpid(), tally)
    assert {k: bare[k] for k in MEMORY} == MEMORY and bare["rss"] == MEMORY["rss_bytes"]
    assert "vm_rss" not in bare and bare["anon_swap"] is None
    assert bare["running"] == 1 and (bare["answered"], bare["failed"]) == (2, 1)
    assert own["rss"] == own["vm_rss"] > 0 and own["anon_swap"] >= own["rss_anon"] > 0


def test_marks_compare_the_end_with_the_third_of_the_run():
    samples = [{"t": t, "rss": rss, "anon_swap": None} for t, rss in ((0, 100), (580, 200), (610, 210), (1800, 220))]
    marks = soak.marks(samples, minutes=30)
    assert (marks["start"]["rss"], marks["third"]["rss"], marks["end"]["rss"]) == (100, 210, 220)
    assert marks["end_over_third"] == {"rss": round(220 / 210, 4), "anon_swap": None}

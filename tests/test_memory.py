"""Bounded memory: MLX's buffer cache capped and emptied when the engine falls idle; RSS, MLX's
memory and the prompt cache's bytes in /health and the metrics."""

import json
import urllib.request

import mlx.core as mx
import pytest
from conftest import Daemon, until

from daemon.engine.memory import CACHE_BYTES, limit_cache, release
from daemon.server.response_models import HealthMemory


@pytest.fixture
def cache_limit_kept():
    before = mx.set_cache_limit(0)
    mx.set_cache_limit(before)
    yield before
    mx.set_cache_limit(before)


def test_the_cache_limit_by_backend_and_setting(cache_limit_kept):
    assert limit_cache(None, gpu=False) == cache_limit_kept == 32 << 20  # the CPU build's own cap, kept
    assert limit_cache(None, gpu=True) == CACHE_BYTES == mx.set_cache_limit(CACHE_BYTES)
    assert limit_cache(5 << 20, gpu=True) == 5 << 20 == mx.set_cache_limit(5 << 20)


def test_release_empties_the_cache(cache_limit_kept):
    mx.eval(mx.ones((256, 1024)) * 2)  # freed at once: its buffers go to the cache
    assert mx.get_cache_memory() > 0
    release()
    assert mx.get_cache_memory() == 0


def health(daemon) -> dict:
    with urllib.request.urlopen(daemon.url + "/health") as r:
        return json.load(r)


def test_health_and_metrics_show_the_memory(tiny_gguf):
    daemon = Daemon("--model", str(tiny_gguf), "--drafter", "random", env={"MTPD_MLX_CACHE_BYTES": str(8 << 20)})
    try:
        client = daemon.client()
        for _ in range(2):  # the second is served from the prompt cache the first filled
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 200}],
                                           max_tokens=8, temperature=0)
        # the engine releases MLX's cache once it falls idle, a moment after the answer is sent
        served = until(lambda: (h := health(daemon))["memory"]["mlx_cache_bytes"] == 0 and h, timeout=10)
        memory = served["memory"]
        with urllib.request.urlopen(daemon.url + "/metrics") as r:
            metrics = r.read().decode()
    finally:
        assert daemon.stop() == 0, daemon.log()
    loaded = next(r for r in daemon.log_records() if r["event"] == "model loaded")
    assert loaded["mlx_cache_limit"] == 8 << 20
    assert served["speed_paths"] == {"forms": loaded["speed_paths"], "probe_ms": loaded["probe_ms"]}  # the probe's
    assert set(memory) == set(HealthMemory.model_fields)  # as /openapi.json documents it
    assert memory["rss_bytes"] > memory["mlx_active_bytes"] > memory["prompt_cache_bytes"] > 0
    assert memory["mlx_cache_bytes"] == 0  # released once the last answer was done
    assert memory["mlx_peak_bytes"] >= memory["mlx_active_bytes"]
    assert f'mtpd_prompt_cache_bytes{{tier="memory"}} {float(memory["prompt_cache_bytes"])}' in metrics
    rss = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("mtpd_resident_memory_bytes ")))
    assert rss > memory["mlx_active_bytes"]

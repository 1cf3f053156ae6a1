"""Metric values from a known sequence of steps, and every metric documented."""

import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from daemon.engine.records import Finished, SpecStats, Step
from daemon.server.metrics import Metrics

DOCS = Path(__file__).parent.parent / "docs" / "metrics.md"


def value(m: Metrics, name: str, **labels) -> float:
    """The series of model "m" (a per-request metric), else the one without a model label."""
    found = m.registry.get_sample_value(name, {**labels, "model": "m"})
    return found if found is not None else m.registry.get_sample_value(name, labels)


def finished(steps: list[tuple[str, Step]]) -> Finished:
    stats = SpecStats()
    for content_class, step in steps:
        stats.observe_step(step, content_class)
    return Finished("stop", prompt_tokens=30, completion_tokens=8, cached_tokens=12, ttft_seconds=0.2,
                    decode_seconds=0.35, stats=stats)


STEPS = [
    ("code", Step((1, 2, 3), 2, 2, seconds=0.10, expected_speedup=1.5)),
    ("code", Step((1, 2), 2, 1, seconds=0.10, expected_speedup=1.4)),
    ("code", Step((1, 2, 3, 4), 4, 3, lookup=True, seconds=0.11, expected_speedup=1.9)),
    ("prose", Step((1,), 1, 0, seconds=0.09, expected_speedup=1.1)),
    ("prose", Step((1,), seconds=0.07)),
]


def test_values_follow_the_steps():
    m = Metrics()
    done = finished(STEPS)
    assert (done.stats.drafted, done.stats.accepted, done.stats.lookup_drafted, done.stats.lookup_accepted) == (9, 6, 4, 3)
    assert done.stats.drafted_by_position == [4, 3, 1, 1] and done.stats.accepted_by_position == [3, 2, 1, 0]
    assert done.stats.speculative_rate() == pytest.approx((6 + 4) / 0.40)  # accepted + one own token per step
    m.observe_request(done, "m")
    m.observe_request(done, "m")
    m.observe_request(done, "other")
    assert m.registry.get_sample_value("mtpd_prompt_tokens_total", {"model": "other"}) == 30
    assert value(m, "mtpd_prompt_tokens_total") == 60 and value(m, "mtpd_completion_tokens_total") == 16
    assert value(m, "mtpd_cached_prompt_tokens_total") == 24
    assert value(m, "mtpd_prompt_cache_lookups_total", result="hit") == 2
    assert value(m, "mtpd_speculative_steps_total", content_class="code", source="mtp") == 4
    assert value(m, "mtpd_speculative_steps_total", content_class="code", source="lookup") == 2
    assert value(m, "mtpd_speculative_steps_total", content_class="prose", source="mtp") == 2
    assert value(m, "mtpd_draft_tokens_total", content_class="code", source="mtp") == 8
    assert value(m, "mtpd_draft_tokens_total", content_class="code", source="lookup") == 8
    assert value(m, "mtpd_accepted_tokens_total", content_class="code", source="mtp") == 6
    assert value(m, "mtpd_accepted_tokens_total", content_class="code", source="lookup") == 6
    assert value(m, "mtpd_accepted_tokens_total", content_class="prose", source="mtp") == 0
    assert value(m, "mtpd_draft_tokens_by_position_total", position="1") == 8
    assert value(m, "mtpd_accepted_tokens_by_position_total", position="2") == 4
    assert value(m, "mtpd_draft_length_count") == 10 and value(m, "mtpd_draft_length_sum") == 18
    assert value(m, "mtpd_draft_length_bucket", le="0.0") == 2
    assert value(m, "mtpd_step_seconds_count", kind="speculative") == 8
    assert value(m, "mtpd_speculation_active") == 0  # the last step was plain
    assert abs(value(m, "mtpd_inter_token_latency_seconds_sum") - 2 * 0.35 / 7) < 1e-9
    m.observe_request(finished(STEPS[:1]), "m")
    assert value(m, "mtpd_speculation_active") == 1


def test_every_metric_is_documented():
    names = set(re.findall(r"^# TYPE (mtpd_\w+) ", generate_latest(Metrics().registry).decode(), re.M))
    documented = DOCS.read_text()
    missing = [n for n in names if f"`{n}`" not in documented]
    assert names and not missing, missing

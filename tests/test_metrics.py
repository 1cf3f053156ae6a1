"""Metric values from a known sequence of steps, and every metric documented."""

import re
from pathlib import Path

from prometheus_client import generate_latest

from daemon.engine.records import Finished
from daemon.server.metrics import Metrics
from policies.recording import StepRecord

README = Path(__file__).parent.parent / "README.md"


def value(m: Metrics, name: str, **labels) -> float:
    return m.registry.get_sample_value(name, labels)


def known_request():
    steps = [
        StepRecord("code", 2, 2, 0.10, 1.5),
        StepRecord("code", 2, 1, 0.10, 1.4),
        StepRecord("code", 4, 3, 0.11, 1.9, lookup=True),
        StepRecord("prose", 1, 0, 0.09, 1.1),
        StepRecord("prose", 0, 0, 0.07, None),
    ]
    done = Finished("stop", prompt_tokens=30, completion_tokens=8, cached_tokens=12, ttft_seconds=0.2,
                    decode_seconds=0.35, drafted=9, accepted=6, drafted_by_position=(4, 3, 1, 1),
                    accepted_by_position=(3, 2, 1, 0), lookup_drafted=4, lookup_accepted=3)
    return done, steps


def test_values_follow_the_steps():
    m = Metrics()
    done, steps = known_request()
    m.observe_request(done, steps)
    m.observe_request(done, steps)
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
    m.observe_request(done, steps[:1])
    assert value(m, "mtpd_speculation_active") == 1


def test_every_metric_is_documented_in_the_readme():
    names = set(re.findall(r"^# TYPE (mtpd_\w+) ", generate_latest(Metrics().registry).decode(), re.M))
    documented = README.read_text()
    missing = [n for n in names if f"`{n}`" not in documented]
    assert names and not missing, missing

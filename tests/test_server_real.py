"""The daemon on the embedded default model: prompt cache across turns and across restarts."""

import pytest
from conftest import Daemon
from test_blas import EXPECTED_BLAS

pytestmark = pytest.mark.real_model

SYSTEM = (
    "You are a careful senior Python reviewer. Answer briefly, show code in fenced blocks, prefer the "
    "standard library, name edge cases, and never invent APIs. When asked for a function, give its "
    "signature with type hints and a one-line docstring, then a short example of its use."
)


def test_second_turn_and_restart_reuse_the_prompt_cache():
    first_turn = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Reverse a string."}]
    daemon = Daemon()
    try:
        client = daemon.client()
        one = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=first_turn, max_tokens=24,
                                             temperature=0)
        assert one.usage.prompt_tokens_details.cached_tokens == 0
        assert one.model_extra["mtpd"]["drafted_tokens"] > 0  # the shipped drafter, adaptive by default
        second_turn = [*first_turn, {"role": "assistant", "content": one.choices[0].message.content},
                       {"role": "user", "content": "Now without slicing."}]
        two = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=second_turn, max_tokens=8,
                                             temperature=0)
        assert two.usage.prompt_tokens_details.cached_tokens >= one.usage.prompt_tokens - 1
    finally:
        assert daemon.stop() == 0
    loaded = next(r for r in daemon.log_records() if r.get("event") == "model loaded")
    assert loaded["blas"].startswith(EXPECTED_BLAS) and loaded["drafter"] == "smollm2-135m-instruct"
    column_major = "column_major" in loaded["speed_paths"]  # the start-up probe's choice (daemon.cpu.forms)
    assert loaded["row_major_blocks"] == (30 if EXPECTED_BLAS == "Intel MKL" and column_major else 0)
    restarted = Daemon(cache_dir=daemon.cache_dir)
    try:
        other = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Sum a list."}]
        three = restarted.client().chat.completions.create(model="SmolLM2-135M-Instruct", messages=other,
                                                           max_tokens=8, temperature=0)
        cached = three.usage.prompt_tokens_details.cached_tokens
        assert 40 < cached < three.usage.prompt_tokens  # the system prompt, from disk
    finally:
        assert restarted.stop() == 0

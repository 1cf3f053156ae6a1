"""The prompt cache reuses prefixes without changing a token, and survives restarts and damage."""

import math

import mlx.core as mx
import pytest

from daemon.engine.generate import generate
from daemon.engine.prompt_cache import PromptCache, common_prefix
from daemon.engine.records import Finished, Request
from daemon.engine.sampling import SamplingParams
from daemon.models.loading import load
from policies.fixed import Fixed

SYSTEM = tuple(range(40, 140))  # a "system prompt" of 100 tokens
TURN_1 = (*SYSTEM, 7, 8, 9)
TURN_2 = (*SYSTEM, 7, 8, 9, 200, 201, 202, 203)  # ids < the tiny vocabulary (267)
MB = 1 << 20


def finished(lm, request, policy=None, **kw) -> Finished:
    return list(generate(lm, request, policy, **kw))[-1]


@pytest.fixture(scope="module")
def drafted_lm(tiny_gguf):
    return load(str(tiny_gguf), drafter="random")


def test_common_prefix():
    assert common_prefix((1, 2, 3), (1, 2, 4, 5)) == 2
    assert common_prefix((1, 2), (1, 2, 3)) == 2
    assert common_prefix((), (1,)) == 0 and common_prefix((5,), (6,)) == 0


@pytest.mark.parametrize("policy", [Fixed(0), Fixed(2)])
def test_second_turn_reuses_the_first_and_keeps_every_token(drafted_lm, policy):
    cache = PromptCache(64 * MB)
    plain = finished(drafted_lm, Request(TURN_2, max_tokens=30), Fixed(0))
    first = finished(drafted_lm, Request(TURN_1, max_tokens=30), policy, prompt_cache=cache)
    second = finished(drafted_lm, Request(TURN_2, max_tokens=30), policy, prompt_cache=cache)
    assert first.cached_tokens == 0
    assert second.cached_tokens == len(TURN_1)
    assert second.token_ids == plain.token_ids
    again = finished(drafted_lm, Request(TURN_2, max_tokens=30), policy, prompt_cache=cache)
    assert again.cached_tokens == len(TURN_2) - 1 and again.token_ids == plain.token_ids
    assert cache.hits == 2 and cache.misses == 1


def test_reuse_does_not_alter_the_stored_entry(drafted_lm):
    cache = PromptCache(64 * MB)
    finished(drafted_lm, Request(TURN_1, max_tokens=5), prompt_cache=cache)
    before = [mx.array(k) for k in cache._memory[TURN_1].keys]
    finished(drafted_lm, Request(TURN_2, max_tokens=40), prompt_cache=cache)
    after = cache._memory[TURN_1].keys
    assert all(mx.array_equal(a, b).item() for a, b in zip(before, after))


def test_memory_is_bounded_in_bytes(drafted_lm):
    one = PromptCache(64 * MB)
    finished(drafted_lm, Request(TURN_1, max_tokens=2), prompt_cache=one)
    entry_bytes = one.nbytes
    cache = PromptCache(int(entry_bytes * 2.5))
    for i in range(5):
        finished(drafted_lm, Request((i + 1, *TURN_1[1:]), max_tokens=2), prompt_cache=cache)
    assert cache.nbytes <= int(entry_bytes * 2.5) and len(cache._memory) == 2


def test_system_prompt_persists_across_restarts(drafted_lm, tmp_path):
    plain = finished(drafted_lm, Request(TURN_2, max_tokens=20))
    cache = PromptCache(64 * MB, tmp_path, 64 * MB)
    finished(drafted_lm, Request(TURN_1, max_tokens=5, persist_prefix=len(SYSTEM)), prompt_cache=cache)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    restarted = PromptCache(64 * MB, tmp_path, 64 * MB)
    done = finished(drafted_lm, Request(TURN_2, max_tokens=20), Fixed(2), prompt_cache=restarted)
    assert done.cached_tokens == len(SYSTEM) and done.token_ids == plain.token_ids


def test_damaged_files_are_dropped_not_fatal(drafted_lm, tmp_path):
    cache = PromptCache(64 * MB, tmp_path, 64 * MB)
    finished(drafted_lm, Request(TURN_1, max_tokens=2, persist_prefix=len(SYSTEM)), prompt_cache=cache)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:1000])  # a torn write
    (tmp_path / "x.123.tmp.safetensors").write_bytes(b"partial")
    restarted = PromptCache(64 * MB, tmp_path, 64 * MB)
    assert list(tmp_path.iterdir()) == []
    done = finished(drafted_lm, Request(TURN_2, max_tokens=5), prompt_cache=restarted)
    assert done.cached_tokens == 0 and done.completion_tokens == 5


def test_disk_is_bounded_in_bytes(drafted_lm, tmp_path):
    probe = PromptCache(64 * MB, tmp_path / "probe", 64 * MB)
    finished(drafted_lm, Request(TURN_1, max_tokens=1, persist_prefix=len(SYSTEM)), prompt_cache=probe)
    size = next((tmp_path / "probe").glob("*.safetensors")).stat().st_size
    cache = PromptCache(64 * MB, tmp_path / "d", int(size * 1.5))
    for i in range(3):
        prompt = (i + 1, *TURN_1[1:])
        finished(drafted_lm, Request(prompt, max_tokens=1, persist_prefix=len(SYSTEM)), prompt_cache=cache)
    assert len(list((tmp_path / "d").glob("*.safetensors"))) == 1


@pytest.mark.parametrize("policy", [Fixed(0), Fixed(3)])
def test_logprobs_are_the_models(drafted_lm, policy):
    done_records = list(generate(drafted_lm, Request(TURN_1, max_tokens=6, logprobs=3), policy))
    deltas = done_records[:-1]
    ids = list(TURN_1)
    for d in deltas:
        for token, lp in zip(d.token_ids, d.logprobs):
            logits = drafted_lm.model(mx.array([ids]))[0, -1]
            expected = (logits - mx.logsumexp(logits)).tolist()
            assert lp.token == token and math.isclose(lp.logprob, expected[token], abs_tol=1e-3)
            assert [t for t, _ in lp.top] == sorted(range(len(expected)), key=lambda i: -expected[i])[:3]
            ids.append(token)
    assert sum(len(d.logprobs) for d in deltas) == done_records[-1].completion_tokens == 6


def test_sampled_logprobs_are_reported_too(drafted_lm):
    request = Request(TURN_1, max_tokens=4, sampling=SamplingParams(0.8, seed=1), logprobs=0)
    deltas = list(generate(drafted_lm, request, Fixed(2)))[:-1]
    assert all(len(d.logprobs) == len(d.token_ids) and all(lp.logprob <= 0 for lp in d.logprobs) for d in deltas)

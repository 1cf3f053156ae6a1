import copy
import dataclasses

import mlx.core as mx
import pytest

from daemon.engine import plain
from daemon.engine.generate import generate
from daemon.engine.records import Delta, Finished, Request
from daemon.engine.sampling import SamplingParams

PROMPT = (1, 80, 120, 7, 200, 33, 150)


def run(lm, request):
    records = list(generate(lm, request))
    deltas = [r for r in records if isinstance(r, Delta)]
    assert isinstance(records[-1], Finished) and all(isinstance(r, Delta) for r in records[:-1])
    return deltas, records[-1]


def reference_greedy(model, prompt, n, eos=2):
    """Full recomputation without any cache: the definition of greedy decoding."""
    ids = list(prompt)
    for _ in range(n):
        token = mx.argmax(model(mx.array([ids]))[0, -1]).item()
        if token == eos:
            return ids[len(prompt) :], "stop"
        ids.append(token)
    return ids[len(prompt) :], "length"


def test_greedy_matches_uncached_reference(tiny_lm):
    expected, reason = reference_greedy(tiny_lm.model, PROMPT, 24)
    deltas, done = run(tiny_lm, Request(PROMPT, max_tokens=24))
    assert [t for d in deltas for t in d.token_ids] == expected
    assert list(done.token_ids) == expected
    assert done.finish_reason == reason
    assert done.completion_tokens == len(expected) and done.prompt_tokens == len(PROMPT)


@pytest.mark.parametrize("metal", [False, True])
def test_both_plain_loops_match_the_reference(tiny_lm, monkeypatch, metal):
    """The CPU loop (read, then build the next forward) and Metal's (queue the next forward first)
    give the same greedy tokens; the queued one runs here too, on the CPU."""
    monkeypatch.setattr(plain, "on_gpu", lambda: metal)
    expected, _ = reference_greedy(tiny_lm.model, PROMPT, 24)
    deltas, _ = run(tiny_lm, Request(PROMPT, max_tokens=24))
    assert [t for d in deltas for t in d.token_ids] == expected


def test_max_tokens_ends_with_length(tiny_lm):
    _, done = run(tiny_lm, Request(PROMPT, max_tokens=3))
    assert done.completion_tokens == 3 and done.finish_reason == "length"


def test_eos_ends_with_stop_and_is_not_emitted(tiny_lm):
    expected, _ = reference_greedy(tiny_lm.model, PROMPT, 12)
    eos = expected[5]
    tokenizer = copy.copy(tiny_lm.tokenizer)
    tokenizer._eos_token_ids = {eos}
    _, done = run(dataclasses.replace(tiny_lm, tokenizer=tokenizer), Request(PROMPT, max_tokens=12))
    assert done.finish_reason == "stop"
    assert list(done.token_ids) == expected[: expected.index(eos)]


def test_stop_string_cuts_text(tiny_lm):
    deltas, _ = run(tiny_lm, Request(PROMPT, max_tokens=24))
    full = "".join(d.text for d in deltas)
    stop = full[8:11]
    deltas, done = run(tiny_lm, Request(PROMPT, max_tokens=24, stop=(stop,)))
    assert "".join(d.text for d in deltas) == full[: full.index(stop)]
    assert done.finish_reason == "stop"
    assert done.completion_tokens < 24


def test_seeded_sampling_repeats_and_seeds_differ(tiny_lm):
    def ids(seed):
        return run(tiny_lm, Request(PROMPT, max_tokens=16, sampling=SamplingParams(1.0, seed=seed)))[1].token_ids

    assert ids(3) == ids(3)
    assert ids(3) != ids(4)


@pytest.mark.parametrize("bad", [dict(prompt_ids=(), max_tokens=4), dict(prompt_ids=(1,), max_tokens=0)])
def test_bad_requests_are_rejected(bad):
    with pytest.raises(ValueError):
        Request(**bad)


def test_speed_counts_only_the_tokens_after_the_first_step():
    """Drafts accepted with the first token come with it, in no decode time of their own."""
    done = Finished("length", 5, 11, 0, 0.2, 0.001, first_tokens=10)
    assert done.tokens_per_second == pytest.approx(1000.0)
    assert dataclasses.replace(done, first_tokens=11).tokens_per_second == 0.0
    assert dataclasses.replace(done, first_tokens=1).tokens_per_second == pytest.approx(10000.0)


def test_the_first_steps_tokens_are_recorded(tiny_gguf):
    from daemon.models.loading import load
    from policies.fixed import Fixed

    lm = load(str(tiny_gguf), drafter="random")
    records = list(generate(lm, Request(PROMPT * 4, max_tokens=24), Fixed(3)))
    first = next(r for r in records if isinstance(r, Delta) and r.token_ids)
    assert records[-1].first_tokens == len(first.token_ids) >= 1

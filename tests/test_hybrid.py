"""Targets whose caches cannot trim (Gated DeltaNet in Qwen3.5 / Qwen3-Next, Mamba in Nemotron-H, the
sliding windows of Gemma 3 and Step-3.5 once they wrap, DeepSeek V4's window and compressed groups):
a partly rejected draft is taken back exactly, the recurrent state, the window or the layer cache
included (daemon.engine.rollback)."""

import mlx.core as mx
import numpy as np
import pytest
from doubles import RuleDrafter, planted_errors, speculated_cache
from families import write_family
from mlx_lm.models.cache import ArraysCache, RotatingKVCache, make_prompt_cache
from mlx_lm.models.deepseek_v41 import LayerCache

from daemon.engine.generate import generate
from daemon.engine.records import Request
from daemon.engine.rollback import keep_states
from daemon.models.loading import load
from policies.fixed import Fixed

PROMPT = (1, 80, 120, 7, 200, 33, 150)
HYBRIDS = ["qwen3_5", "qwen3_next", "nemotron_h", "deepseek_v41", "gemma3_text", "step3p5"]


@pytest.fixture(scope="module")
def hybrids(tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("hybrid")
    vocab = tiny_lm.config["vocab_size"]
    seeds = {"gemma3_text": 3}  # seed 2's tiny Gemma 3 ends its answer after 11 tokens
    return {f: load(str(write_family(root / f, f, tiny_lm.tokenizer, vocab, seed=seeds.get(f, 2)))) for f in HYBRIDS}


def planted(lm, k):
    wrong_at = set(np.flatnonzero(np.random.default_rng(k).random(200) < 0.8 / k).tolist())
    return RuleDrafter(PROMPT[0], planted_errors(lm.model, wrong_at, lm.config["vocab_size"]), lm.config["hidden_size"])


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("family", HYBRIDS)
def test_hybrid_greedy_identical_with_rejections_at_every_position(hybrids, family, k):
    lm = hybrids[family]
    assert keep_states(make_prompt_cache(lm.model)) is not None  # some layers cannot trim
    plain = list(generate(lm, Request(PROMPT, max_tokens=40), Fixed(0)))[-1]
    lm.drafter, lm.drafter_name = planted(lm, k), "rule"
    try:
        spec = list(generate(lm, Request(PROMPT, max_tokens=40), Fixed(k)))[-1]
    finally:
        lm.drafter = lm.drafter_name = None
    assert spec.token_ids == plain.token_ids
    rejected = [d - a for d, a in zip(spec.stats.drafted_by_position, spec.stats.accepted_by_position)]
    assert len(rejected) == k and all(r > 0 for r in rejected) and all(a > 0 for a in spec.stats.accepted_by_position)


@pytest.mark.parametrize("family", HYBRIDS)
def test_hybrid_cache_after_speculation_equals_plain_prefill(hybrids, family):
    lm = hybrids[family]
    model = lm.model
    cache, sequence = speculated_cache(model, planted(lm, 3), PROMPT, 3, 30)
    reference = make_prompt_cache(model)
    model(mx.array([sequence]), cache=reference)
    for ours, theirs in zip(cache, reference):
        if isinstance(ours, ArraysCache):
            for a, b in zip(ours.cache, theirs.cache):
                np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)
        elif isinstance(ours, RotatingKVCache):  # the window's rows in order (a prefill keeps more before them)
            window = ours.max_size - 1
            assert ours.offset == len(sequence) > ours.max_size
            for a, b in zip(ours.state[:2], theirs.state[:2]):
                a, b = ours._temporal_order(a), theirs._temporal_order(b)
                np.testing.assert_allclose(np.array(a[..., -window:, :]), np.array(b[..., -window:, :]), atol=1e-4)
        elif isinstance(ours, LayerCache):  # window, compressed groups, index keys, the open group, offset
            assert ours.offset == len(sequence) and ours.window.shape[1] == lm.config["sliding_window"]
            for a, b in zip(ours.state, theirs.state):
                assert (a is None) == (b is None)
                if a is not None:
                    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)
        else:
            assert ours.offset == len(sequence)
            for a, b in zip(ours.state[:2], theirs.state[:2]):
                np.testing.assert_allclose(np.array(a[..., : len(sequence), :]), np.array(b[..., : len(sequence), :]),
                                           atol=1e-4)

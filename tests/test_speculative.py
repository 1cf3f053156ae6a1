"""Speculative decoding is lossless: greedy to the token, sampling in distribution."""

import dataclasses
import math

import mlx.core as mx
import numpy as np
import pytest
from doubles import RuleDrafter, known_sequence, planted_errors, small_vocab, speculated_cache, target_logits
from mlx_lm.models.cache import make_prompt_cache

from daemon.engine.forward import hidden_tap
from daemon.engine.generate import generate
from daemon.engine.records import Finished, Request
from daemon.engine.sampling import SamplingParams
from policies.fixed import Fixed
from policies.plan import Plan

PROMPT = (1, 80, 120, 7, 200, 33, 150)


def finished(lm, request, policy, **kw) -> Finished:
    return list(generate(lm, request, policy, **kw))[-1]


def with_drafter(lm, drafter):
    return dataclasses.replace(lm, drafter=drafter, drafter_name="rule")


@pytest.fixture(scope="module")
def plain_ids(tiny_lm):
    return finished(tiny_lm, Request(PROMPT, max_tokens=80), Fixed(0)).token_ids


@pytest.mark.parametrize("k", range(1, 9))
def test_greedy_identical_with_rejections_at_every_position(tiny_lm, plain_ids, k):
    vocab = tiny_lm.config["vocab_size"]
    wrong_at = set(np.flatnonzero(np.random.default_rng(k).random(200) < 0.8 / k).tolist())
    drafter = RuleDrafter(PROMPT[0], planted_errors(tiny_lm.model, wrong_at, vocab), 64)
    done = finished(with_drafter(tiny_lm, drafter), Request(PROMPT, max_tokens=80), Fixed(k))
    assert done.token_ids == plain_ids
    assert len(done.stats.drafted_by_position) == k
    rejected = [d - a for d, a in zip(done.stats.drafted_by_position, done.stats.accepted_by_position)]
    assert all(r > 0 for r in rejected), (done.stats.drafted_by_position, done.stats.accepted_by_position)
    assert all(a > 0 for a in done.stats.accepted_by_position)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_mtp_drafter_with_random_weights_gives_plain_output(tiny_gguf, plain_ids, k):
    from daemon.models.loading import load

    lm = load(str(tiny_gguf), drafter="random")
    done = finished(lm, Request(PROMPT, max_tokens=80), Fixed(k))
    assert done.token_ids == plain_ids and done.stats.drafted > 0


def test_block_features_tap_changes_nothing_and_reads_the_block(tiny_lm):
    """A drafter reading block 0's output: the recording tap leaves the logits as they were, and
    what it reads is that block's output."""
    from mlx_lm.models.base import create_attention_mask

    model = tiny_lm.model
    x = mx.array([list(PROMPT)])
    before = model(x)
    tap = hidden_tap(model, "post_norm+0")
    after = model(x)
    assert mx.array_equal(before, after)
    h = model.model.embed_tokens(x)
    block0 = model.model.layers[0](h, create_attention_mask(h, None), None)
    width = tiny_lm.config["hidden_size"]
    np.testing.assert_allclose(np.array(tap.hidden("post_norm+0")[..., width:]), np.array(block0), atol=1e-5)
    np.testing.assert_array_equal(np.array(tap.hidden("post_norm+0")[..., :width]), np.array(tap.hidden("post_norm")))


@pytest.mark.parametrize("k", [1, 3])
def test_drafter_with_block_features_gives_plain_output(tiny_gguf, plain_ids, tmp_path, k):
    """A random drafter that also reads block 0: saved, loaded back, lossless (chained drafts
    keep the block features of the last real position)."""
    from daemon.models import drafter_io, mtp
    from daemon.models.loading import load

    lm = load(str(tiny_gguf), drafter="none")
    mx.random.seed(4)
    config = mtp.DrafterConfig(lm.config, lm.config["num_hidden_layers"], feature_layers=[0])
    drafter_io.save(drafter_io.build(config), tmp_path)
    lm = load(str(tiny_gguf), drafter=str(tmp_path))
    assert lm.drafter.config.feature_layers == [0] and lm.drafter.config.source == "post_norm+0"
    done = finished(lm, Request(PROMPT, max_tokens=80), Fixed(k))
    assert done.token_ids == plain_ids and done.stats.drafted > 0


def test_tie_guard_everywhere_changes_nothing(tiny_lm, plain_ids):
    """margin = inf sends every position through the canonical recomputation."""
    done = finished(tiny_lm, Request(PROMPT, max_tokens=20), Fixed(0), tie_margin=math.inf)
    assert done.token_ids == plain_ids[:20] and done.stats.tie_rechecks == 20
    drafter = RuleDrafter(PROMPT[0], target_logits(tiny_lm.model), 64)
    done = finished(with_drafter(tiny_lm, drafter), Request(PROMPT, max_tokens=20), Fixed(3), tie_margin=math.inf)
    assert done.token_ids == plain_ids[:20] and done.stats.tie_rechecks >= 20


def test_target_cache_after_speculation_equals_plain_prefill(tiny_lm):
    model = tiny_lm.model
    wrong_at = {n for n in range(200) if n % 4 == 0}
    drafter = RuleDrafter(PROMPT[0], planted_errors(model, wrong_at, tiny_lm.config["vocab_size"]), 64)
    cache, sequence = speculated_cache(model, drafter, PROMPT, 4, 30)
    assert cache[0].offset == len(sequence)
    reference = make_prompt_cache(model)
    model(mx.array([sequence]), cache=reference)
    for ours, theirs in zip(cache, reference):
        for a, b in zip(ours.state[:2], theirs.state[:2]):
            np.testing.assert_allclose(np.array(a[..., : len(sequence), :]), np.array(b[..., : len(sequence), :]), atol=1e-5)


# --- sampling keeps the target's distribution --------------------------------------------------

VOCAB = 8
TEMPERATURE = 1.3


@pytest.fixture(scope="module")
def small_vocab_lm(tiny_lm):
    return small_vocab(tiny_lm.tokenizer, VOCAB)


def exact_joint(model, prompt, params):
    """P(t2, t3) after the prompt, summed over t1, from the target alone. [V, V]"""
    from daemon.engine.sampling import target_logprobs

    def p(prefix):
        return np.exp(np.array(target_logprobs(model(mx.array([prefix]))[0, -1], params)))

    joint = np.zeros((VOCAB, VOCAB))
    for t1, p1 in enumerate(p(prompt)):
        for t2, p2 in enumerate(p(prompt + [t1])):
            joint[t2] += p1 * p2 * p(prompt + [t1, t2])
    return joint


def chi2_critical(dof: int, z: float = 3.09) -> float:
    """Wilson-Hilferty: the chi-square quantile at p = 0.001."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def assert_joint(counts: np.ndarray, expected: np.ndarray, case: str) -> None:
    """The answers' counts [V, V] against the expected ones: nothing outside the target's support,
    and the chi-square test passes (cells expected under 5 pooled)."""
    keep = expected >= 5
    observed_rest, expected_rest = counts[~keep].sum(), expected[~keep].sum()
    assert counts[expected == 0].sum() == 0  # nothing outside the target's support
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    if expected_rest > 0:
        chi2 += (observed_rest - expected_rest) ** 2 / expected_rest
    dof = int(keep.sum()) + (expected_rest > 0) - 1
    assert chi2 < chi2_critical(dof), (case, chi2, dof)


def disjoint_from_top3(model, params):
    def rule(prefix):
        logits = model(mx.array([prefix]))[0, -1]
        top3 = mx.argsort(-logits)[:3]
        mask = mx.zeros(VOCAB).at[top3].add(1) > 0
        return mx.where(mask, -mx.inf, 0.0)

    return rule


def one_hot_at_target_argmax(model):
    """A deterministic drafter (q one-hot) that proposes the target's most likely token."""

    def rule(prefix):
        best = mx.argmax(model(mx.array([prefix]))[0, -1])
        return mx.where(mx.arange(VOCAB) == best, 30.0, -30.0)

    return rule


class CopyAlways(Fixed):
    """Takes every context-lookup offer whole; plain steps otherwise."""

    name = "copy-always"

    def plan(self, offer, content_class):
        return Plan(len(offer.tokens), lookup=True) if offer.tokens else Plan(0)


@pytest.mark.parametrize("case", ["q_equals_p", "disjoint_supports", "one_hot_q", "lookup", "floored"])
def test_sampling_reproduces_joint_distribution(small_vocab_lm, case, monkeypatch):
    model = small_vocab_lm.model
    # the lookup case: every token but 5 follows a 5 in the prompt, so most steps get an offer
    prompt = [5, 0, 5, 1, 5, 2, 5, 3, 5, 4, 5, 6, 5, 7, 5] if case == "lookup" else [1, 5, 2]
    params = SamplingParams(temperature=TEMPERATURE, top_k=3 if case == "disjoint_supports" else 0)
    rule = {
        "q_equals_p": target_logits(model),
        "disjoint_supports": disjoint_from_top3(model, params),
        "one_hot_q": one_hot_at_target_argmax(model),
        "lookup": target_logits(model),
        "floored": target_logits(model),
    }[case]
    policy = {"lookup": CopyAlways(0), "floored": Floored(2, 0.45)}.get(case, Fixed(2))
    lm = with_drafter(small_vocab_lm, RuleDrafter(prompt[0], rule, 32))
    monkeypatch.setattr(lm.tokenizer, "_eos_token_ids", set())  # every token id is ordinary here (this test only)
    runs = 2500
    counts = np.zeros((VOCAB, VOCAB))
    drafted = accepted = copied = 0
    for seed in range(runs):
        sampling = dataclasses.replace(params, seed=seed)
        done = finished(lm, Request(tuple(prompt), max_tokens=3, sampling=sampling), policy)
        counts[done.token_ids[1], done.token_ids[2]] += 1
        drafted, accepted = drafted + done.stats.drafted, accepted + done.stats.accepted
        copied += done.stats.lookup_accepted
    assert_joint(counts, exact_joint(model, prompt, params) * runs, case)
    if case == "q_equals_p":
        assert accepted == drafted  # p / q = 1: every draft accepted
    if case == "disjoint_supports":
        assert accepted == 0
    if case == "lookup":
        assert drafted > runs / 2 and 0 < copied == accepted < drafted
    if case == "floored":  # some drafts dropped; a kept one is checked against q above the floor, renormalised
        assert 0 < accepted < drafted < 2 * runs and any(stopped for _, stopped in policy.stops)


def test_adaptive_is_lossless_and_turns_off_when_verification_is_expensive(tiny_lm, plain_ids):
    from daemon.engine.calibration import shared_estimates
    from policies.registry import make_policy

    sequence = list(PROMPT) + list(plain_ids)
    drafter = RuleDrafter(PROMPT[0], known_sequence(sequence, tiny_lm.config["vocab_size"]), 64)  # always right
    lm = with_drafter(tiny_lm, drafter)
    shared = shared_estimates(lm, None)
    cheap = finished(lm, Request(PROMPT, max_tokens=80), make_policy("adaptive", shared))
    assert cheap.token_ids == plain_ids
    assert sum(k > 0 for k in cheap.stats.draft_lengths) > len(cheap.stats.draft_lengths) / 2

    penalty = 0.005  # each extra verified row costs ~5 plain steps of this tiny model
    costly_shared = shared_estimates(lm, None, verify_penalty=penalty)
    costly = finished(lm, Request(PROMPT, max_tokens=80), make_policy("adaptive", costly_shared), verify_penalty=penalty)
    assert costly.token_ids == plain_ids
    assert sum(k == 0 for k in costly.stats.draft_lengths) > 0.8 * len(costly.stats.draft_lengths)


# --- a confidence floor stops drafts the drafter is unsure of ------------------------------------


def unsure_where_wrong(model, wrong_at, vocab: int):
    """Target's argmax, sure of it (p ~ 1); at sequence lengths in `wrong_at` another token, unsure
    (p ~ 0.1 on a vocabulary of hundreds)."""

    def rule(prefix):
        logits = model(mx.array([prefix]))[0, -1]
        best = mx.argmax(logits).item()
        if len(prefix) in wrong_at:
            return mx.where(mx.arange(vocab) == (best + 1) % vocab, 4.0, 0.0)
        return mx.where(mx.arange(vocab) == best, 20.0, -20.0)

    return rule


class Floored(Fixed):
    """fixed:k with a confidence floor; remembers which steps stopped early."""

    def __init__(self, k: int, floor: float):
        super().__init__(k)
        self.floor, self.stops = floor, []

    def plan(self, offer, content_class):
        return Plan(self.k, min_confidence=self.floor)

    def observe(self, drafted, accepted, seconds, stopped):
        self.stops.append((drafted, stopped))


@pytest.mark.parametrize("k", [1, 3])
def test_floor_drops_the_unsure_drafts_and_output_stays_plain(tiny_lm, plain_ids, k):
    vocab = tiny_lm.config["vocab_size"]
    wrong_at = set(np.flatnonzero(np.random.default_rng(k).random(200) < 0.3).tolist())
    drafter = RuleDrafter(PROMPT[0], unsure_where_wrong(tiny_lm.model, wrong_at, vocab), 64)
    policy = Floored(k, 0.5)
    done = finished(with_drafter(tiny_lm, drafter), Request(PROMPT, max_tokens=80), policy)
    assert done.token_ids == plain_ids
    assert done.stats.drafted > 0 and done.stats.accepted == done.stats.drafted  # every wrong draft was dropped, none verified
    assert any(stopped and drafted == 0 for drafted, stopped in policy.stops)  # a first draft dropped: a plain step
    if k > 1:
        assert any(stopped and 0 < drafted < k for drafted, stopped in policy.stops)


def test_without_a_floor_the_same_drafts_are_verified_and_rejected(tiny_lm, plain_ids):
    vocab = tiny_lm.config["vocab_size"]
    wrong_at = set(np.flatnonzero(np.random.default_rng(3).random(200) < 0.3).tolist())
    drafter = RuleDrafter(PROMPT[0], unsure_where_wrong(tiny_lm.model, wrong_at, vocab), 64)
    policy = Floored(3, 0.0)
    done = finished(with_drafter(tiny_lm, drafter), Request(PROMPT, max_tokens=80), policy)
    assert done.token_ids == plain_ids and done.stats.accepted < done.stats.drafted
    assert not any(stopped for _, stopped in policy.stops)


def test_floor_above_one_drops_every_mtp_draft(tiny_gguf, plain_ids):
    from daemon.models.loading import load

    lm = load(str(tiny_gguf), drafter="random")
    policy = Floored(2, 1.5)
    done = finished(lm, Request(PROMPT, max_tokens=80), policy)
    assert done.token_ids == plain_ids and done.stats.drafted == 0
    assert all(drafted == 0 for drafted, _ in policy.stops)
    assert all(stopped for _, stopped in policy.stops[:-1])  # the last step has no room to draft


def test_each_delta_says_its_round_and_every_token_its_origin(tiny_lm, plain_ids):
    """The page's colours: a step's accepted drafts, then the target's own token; one piece of text per
    token; the rounds add up to the request's counts."""
    from daemon.engine.records import Delta, origins

    vocab = tiny_lm.config["vocab_size"]
    wrong_at = set(np.flatnonzero(np.random.default_rng(3).random(200) < 0.3).tolist())
    drafter = RuleDrafter(PROMPT[0], planted_errors(tiny_lm.model, wrong_at, vocab), 64)
    records = list(generate(with_drafter(tiny_lm, drafter), Request(PROMPT, max_tokens=80), Fixed(3)))
    deltas, done = [r for r in records if isinstance(r, Delta)], records[-1]
    assert sum(d.drafted for d in deltas) == done.stats.drafted > 0
    assert sum(d.accepted for d in deltas) == done.stats.accepted > 0
    marks = [o for d in deltas for o in origins(d)]
    assert len(marks) == done.completion_tokens and marks.count("draft") == done.stats.accepted
    assert marks.count("target") == len(deltas) and "lookup" not in marks  # one token of the target's each step
    assert all(len(d.pieces) == len(d.token_ids) and "".join(d.pieces) == d.text for d in deltas)
    assert [t for d in deltas for t in d.token_ids] == list(plain_ids)

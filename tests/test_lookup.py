"""Lookup drafting: the context's n-gram index, the target's phrasebook, and lossless decoding with
copied drafts."""

import dataclasses

import numpy as np
from doubles import RuleDrafter, planted_errors
from test_speculative import CopyAlways, finished, small_vocab_lm  # noqa: F401 (fixture)

from daemon.drafting.lookup import NgramIndex
from daemon.drafting.phrases import Phrasebook
from daemon.engine.records import Request
from policies.adaptive import AdaptivePolicy, SharedEstimates
from policies.classifier import PROSE
from policies.cost import StepCosts
from policies.fixed import Fixed
from policies.plan import NO_OFFER, Proposal


def test_offers_what_followed_the_latest_occurrence_of_the_longest_match():
    index = NgramIndex(n_min=2, n_max=4)
    index.extend([1, 2, 3, 4, 9, 9, 2, 3, 7, 8, 1, 2, 3])
    # (2, 3) last came before 7; but (1, 2, 3) matches longer, and came before 4
    assert index.propose(3) == Proposal((4, 9, 9), 3)
    index.extend([5])
    assert index.propose(3) == Proposal()  # (3, 5) never seen
    index.extend([1, 2])
    assert index.propose(2) == Proposal((3, 5), 2)  # (1, 2) last came before 3, 5


def test_offer_stops_at_the_end_of_the_text():
    index = NgramIndex()
    index.extend([4, 5, 6, 4, 5])
    assert index.propose(8) == Proposal((6, 4, 5), 2)


def test_offers_per_position_and_after_drafts_are_what_propose_would_say():
    """offers[j] is propose(1) once token j was appended; offer_after(drafts) is propose(1) after
    appending them, without appending them."""
    tokens = [1, 2, 3, 4, 9, 9, 2, 3, 7, 8, 1, 2, 3, 5, 1, 2]
    index = NgramIndex()
    index.extend(tokens)
    for j in range(len(tokens)):
        alone = NgramIndex()
        alone.extend(tokens[: j + 1])
        expected = alone.propose(1)
        assert index.offers[j] == ((expected.tokens[0], expected.match) if expected.tokens else (0, 0))
    for drafts in [(), (3,), (3, 5), (7, 8, 1, 2, 3), (6,)]:
        ahead = NgramIndex()
        ahead.extend(tokens + list(drafts))
        assert index.offer_after(drafts) == ahead.offers[-1], drafts
    assert index.offer_after((3,)) == (5, 3) and index.offer_after((6,)) == (0, 0)


def test_copied_drafts_keep_greedy_output_identical(small_vocab_lm):  # noqa: F811
    """Eight tokens: two-token patterns recur, so the lookup offers often and is often wrong."""
    small_vocab_lm.tokenizer._eos_token_ids = set()
    drafter = RuleDrafter(1, planted_errors(small_vocab_lm.model, set(range(200)), 8), 32)  # never used
    lm = dataclasses.replace(small_vocab_lm, drafter=drafter, drafter_name="rule")
    prompt = (1, 5, 2, 7, 3)
    reference = finished(lm, Request(prompt, max_tokens=60), Fixed(0))
    copied = finished(lm, Request(prompt, max_tokens=60), CopyAlways(0))
    assert copied.token_ids == reference.token_ids
    assert copied.stats.lookup_drafted == copied.stats.drafted > 0
    assert 0 < copied.stats.lookup_accepted < copied.stats.lookup_drafted
    assert any(copied.stats.lookup_steps) and not all(copied.stats.lookup_steps)


def test_phrasebook_keeps_the_majority_continuation_and_chains_it(tmp_path):
    seqs = [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 5], [7, 2, 3, 9], [6, 6, 8]]
    book = Phrasebook.build(seqs, n_min=2, n_max=3, min_count=2, min_share=0.5)
    # (2, 3) -> 4 in two of four; (1, 2, 3) -> 4 in two of three; (6, 6) -> 8 and (7, 2) -> 3 once
    assert book.table == {(1, 2): 3, (2, 3): 4, (1, 2, 3): 4}
    assert (2, 3) not in Phrasebook.build(seqs, n_min=2, n_max=3, min_share=0.6).table
    # (0, 1, 2) is unknown, (1, 2) -> 3; then (1, 2, 3) -> 4; then nothing follows (3, 4)
    assert book.propose([0, 1, 2], 8) == Proposal((3, 4), 2, "phrases")
    assert book.propose([0, 1, 2], 1) == Proposal((3,), 2, "phrases")
    assert book.propose([4, 4], 8) == NO_OFFER
    book.save(tmp_path)
    loaded = Phrasebook.load(tmp_path)
    assert (loaded.table, loaded.n_min, loaded.n_max) == (book.table, 2, 3)
    assert Phrasebook.load(tmp_path / "elsewhere") is None


class CountingPhrasebook(Phrasebook):
    offers = 0

    def propose(self, tokens, k):
        offer = super().propose(tokens, k)
        self.offers += bool(offer.tokens)
        return offer


def test_phrasebook_drafts_keep_greedy_output_identical(small_vocab_lm):  # noqa: F811
    """A phrasebook of random text offers where the context has no match yet, and is often wrong."""
    small_vocab_lm.tokenizer._eos_token_ids = set()
    drafter = RuleDrafter(1, planted_errors(small_vocab_lm.model, set(range(200)), 8), 32)  # never used
    rng = np.random.default_rng(0)
    book = CountingPhrasebook.build([rng.integers(0, 8, 400).tolist()], min_count=1, min_share=0.0)
    lm = dataclasses.replace(small_vocab_lm, drafter=drafter, drafter_name="rule", phrases=book)
    prompt = (1, 5, 2, 7, 3)
    reference = finished(lm, Request(prompt, max_tokens=60), Fixed(0))
    copied = finished(lm, Request(prompt, max_tokens=60), CopyAlways(0))
    assert copied.token_ids == reference.token_ids
    assert book.offers > 0
    assert 0 < copied.stats.lookup_accepted < copied.stats.lookup_drafted


def test_adaptive_keeps_phrasebook_and_context_estimates_apart():
    """Context copies always right, phrasebook copies always wrong: it goes on copying the context
    and stops copying the phrasebook (drafting with the drafter instead)."""
    cost = StepCosts(0.006, [0.070 + 0.008 * n for n in range(9)])
    policy = AdaptivePolicy(SharedEstimates(cost))
    context, phrases = Proposal(tuple(range(8)), 3), Proposal(tuple(range(8)), 3, "phrases")
    rng = np.random.default_rng(0)
    for i in range(200):
        offer = phrases if i % 2 else context
        plan = policy.plan(offer, PROSE)
        if plan.lookup:
            accepted = plan.k if offer is context else 0
        else:
            accepted = int(plan.k > 0 and rng.random() < 0.5)
        policy.observe(plan.k, accepted, cost.predict(plan.k, plan.lookup), False)
    assert policy.plan(context, PROSE).lookup
    assert not policy.plan(phrases, PROSE).lookup


def simulate_with_offers(policy, offers, rate_of, cost, steps, seed=0):
    """Every step the lookup offers `offers(i)` tokens after a match of 3; copied drafts are
    accepted position by position with rate_of(i, lookup)[j]. Returns the plans."""
    rng = np.random.default_rng(seed)
    plans = []
    for i in range(steps):
        plan = policy.plan(Proposal(tuple(range(offers(i))), 3) if offers(i) else NO_OFFER, PROSE)
        rates = rate_of(i, plan.lookup)
        accepted = 0
        while accepted < plan.k and rng.random() < rates[accepted]:
            accepted += 1
        policy.observe(plan.k, accepted, cost.predict(plan.k, plan.lookup), False)
        plans.append(plan)
    return plans


def run_policy(copy_rate: float, mtp_rate: float, offers=lambda i: 8) -> list:
    """A fresh adaptive policy for 200 steps; copies accepted at copy_rate, MTP drafts at mtp_rate."""
    cost = StepCosts(0.006, [0.070 + 0.008 * n for n in range(9)])
    rates = lambda i, lookup: [copy_rate if lookup else mtp_rate] * 8  # noqa: E731
    return simulate_with_offers(AdaptivePolicy(SharedEstimates(cost)), offers, rates, cost, 200)


def test_adaptive_copies_long_runs_when_copies_are_accepted():
    tail = run_policy(copy_rate=0.95, mtp_rate=0.3)[-100:]
    assert np.mean([p.lookup for p in tail]) > 0.9
    assert np.mean([p.k for p in tail if p.lookup]) >= 5


def test_adaptive_stops_copying_when_copies_are_rejected():
    """Offers that are always wrong: it falls back to the drafter (accepted 60% of the time)."""
    tail = run_policy(copy_rate=0.0, mtp_rate=0.6)[-100:]
    assert np.mean([p.lookup for p in tail]) < 0.1
    assert np.mean([p.k > 0 for p in tail]) > 0.9


def test_adaptive_copies_only_when_offered():
    plans = run_policy(copy_rate=0.95, mtp_rate=0.5, offers=lambda i: 8 if i % 2 else 0)
    assert not any(p.lookup for i, p in enumerate(plans) if i % 2 == 0)
    assert np.mean([p.lookup for i, p in enumerate(plans[100:]) if i % 2]) > 0.9
    assert all(p.k <= 8 for p in plans)

"""The adaptive policy against simulated acceptance and cost streams (no model)."""

import numpy as np
import pytest

from policies.acceptance import AcceptanceCounts, expected_tokens, observed
from policies.adaptive import AdaptivePolicy, SharedEstimates
from policies.classifier import PROSE, ContentTracker
from policies.cost import StepCosts, best_draft_length, throughput
from policies.plan import NO_OFFER

T_DRAFT, T_PLAIN = 0.004, 0.070


def costs(per_row: float) -> StepCosts:
    return StepCosts(T_DRAFT, [T_PLAIN + per_row * n for n in range(9)])


def simulate(policy, rate_of, cost: StepCosts, steps: int, seed: int = 0, text_of=lambda i: "") -> list[int]:
    """Runs `steps` rounds: drafts are accepted position by position with rate_of(step)[j]; the
    round takes cost.predict(k) seconds. Returns the chosen k per step."""
    rng = np.random.default_rng(seed)
    tracker = ContentTracker()
    chosen = []
    for i in range(steps):
        k = policy.plan(NO_OFFER, tracker.feed(text_of(i))).k
        rates = rate_of(i)
        accepted = 0
        while accepted < k and rng.random() < rates[accepted]:
            accepted += 1
        policy.observe(k, accepted, cost.predict(k), False)
        chosen.append(k)
    return chosen


def fresh(cost: StepCosts) -> AdaptivePolicy:
    return AdaptivePolicy(SharedEstimates(StepCosts.from_dict(cost.to_dict())))


def test_expected_tokens_formula():
    assert expected_tokens([]) == 1.0
    assert expected_tokens([0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25)
    a = 0.7
    assert expected_tokens([a] * 4) == pytest.approx((1 - a**5) / (1 - a))


def test_observed_positions():
    tried, passed = observed(drafted=4, accepted=1)
    assert tried.tolist() == [True, True, False, False]
    assert passed.tolist() == [True, False, False, False]


def test_converges_to_the_best_k():
    cost = costs(per_row=0.008)
    rates = [0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45]
    best = best_draft_length(np.array(rates), cost, 8)
    assert 2 <= best <= 6
    chosen = simulate(fresh(cost), lambda i: rates, cost, 400)
    tail = chosen[-150:]
    share_best = np.mean([k in (best - 1, best, best + 1) for k in tail])
    assert share_best > 0.85, (best, np.bincount(tail))
    achieved = np.mean([throughput(np.array(rates), k, cost) for k in tail])
    assert achieved > 0.95 * throughput(np.array(rates), best, cost)


def test_switches_off_when_verification_grows_as_fast_as_tokens():
    cost = costs(per_row=0.080)  # each extra row costs more than a plain step
    chosen = simulate(fresh(cost), lambda i: [0.8] * 8, cost, 300)
    assert np.mean(np.array(chosen[-200:]) == 0) > 0.9


def test_never_probes_when_even_perfect_drafts_cannot_pay():
    cost = costs(per_row=0.080)
    chosen = simulate(fresh(cost), lambda i: [1.0] * 8, cost, 300)
    assert chosen.count(0) == 300


def test_switches_back_on_when_acceptance_returns():
    cost = costs(per_row=0.008)
    rates = lambda i: [0.05] * 8 if i < 150 else [0.85] * 8  # noqa: E731
    chosen = simulate(fresh(cost), rates, cost, 400)
    assert np.mean(np.array(chosen[100:150]) == 0) > 0.8  # off while drafts fail
    assert np.mean(np.array(chosen[-100:]) >= 2) > 0.9  # on again after


def test_content_class_keeps_separate_estimates():
    """Code is accepted, prose is not: inside the fence it drafts, outside it does not."""
    cost = costs(per_row=0.008)
    policy = fresh(cost)
    is_code = lambda i: (i // 60) % 2 == 1  # noqa: E731
    rates = lambda i: [0.85] * 8 if is_code(i) else [0.05] * 8  # noqa: E731
    text = lambda i: ("\n```python\n" if i % 60 == 0 and is_code(i) else "\n```\n" if i % 60 == 0 and i else "")  # noqa: E731
    words = lambda i: text(i) + ("x = f(y)\n" if is_code(i) else "and then the ")  # noqa: E731
    chosen = np.array(simulate(policy, rates, cost, 480, text_of=words))
    code_steps = np.array([is_code(i) for i in range(480)])
    late = np.arange(480) >= 240
    assert np.mean(chosen[code_steps & late] >= 2) > 0.9
    assert np.mean(chosen[~code_steps & late] == 0) > 0.8
    # each class switch is seen at once: the first steps of a later code block already draft
    assert all(chosen[i] >= 1 for i in (301, 302, 421, 422))


def test_estimates_persist(tmp_path):
    cost = costs(per_row=0.008)
    shared = SharedEstimates(cost, AcceptanceCounts(8), tmp_path / "e.json")
    shared.acceptance.observe("code", 3, 2)
    shared.costs.observe(2, 0.5)
    shared.save()
    again = SharedEstimates.load(tmp_path / "e.json")
    assert again.costs.seconds == shared.costs.seconds
    assert np.allclose(again.acceptance.rates("code"), shared.acceptance.rates("code"))
    (tmp_path / "e.json").write_text("{broken")
    assert SharedEstimates.load(tmp_path / "e.json") is None


def test_costs_of_unseen_draft_lengths_follow_what_real_rounds_cost():
    probe = costs(per_row=0.008)
    probe.observe(1, probe.predict(1) * 1.5)  # real rounds cost half again what the probe said
    assert probe.scale > 1.0
    assert probe.predict(3) > probe.probed[3]  # not yet seen: scaled
    assert probe.predict(0) == probe.seconds[0]  # plain steps are measured on their own


def test_early_rejections_do_not_keep_speculation_off():
    """The prior knows this content is accepted 45% of the time; one request starts with a long run
    of rejections. Its estimate drifts back to the prior while off, so it is on again soon after
    instead of waiting for probes that have backed off."""
    cost = costs(per_row=0.008)
    shared = SharedEstimates(StepCosts.from_dict(cost.to_dict()))
    rng = np.random.default_rng(1)
    for _ in range(300):
        shared.acceptance.observe("prose", 1, int(rng.random() < 0.45))
    policy = AdaptivePolicy(shared)
    chosen = simulate(policy, lambda i: [0.0] * 8 if i < 60 else [0.45, 0.1] + [0.05] * 6, cost, 180)
    assert chosen[:60].count(0) >= 10  # the rejections did switch it off
    assert np.mean([k == 0 for k in chosen[80:]]) < 0.1, chosen


def test_confidence_floor_is_a_rows_cost_in_tokens_at_the_plans_speed():
    from policies.cost import confidence_floor

    rates = np.full(8, 0.6)
    cheap, dear = costs(0.007), costs(0.035)
    floor = confidence_floor(rates, 2, cheap)
    assert floor == pytest.approx(0.007 * throughput(rates, 2, cheap))
    assert 0 < floor < confidence_floor(rates, 2, dear) < 1  # dearer rows: surer drafts needed
    assert confidence_floor(rates, 0, cheap) == 0.0
    assert confidence_floor(rates, 1, costs(0.2)) > 1  # a row dearer than a plain step: nothing pays


def test_plans_carry_the_floor_and_a_dropped_draft_counts_as_rejected():
    policy = fresh(costs(0.007))
    plan = policy.plan(NO_OFFER, PROSE)
    assert plan.k > 0 and 0 < plan.min_confidence < 1
    before = policy.acceptance.rates(policy.klass)[0]
    observations = list(policy.shared.costs.observations)
    for _ in range(10):
        policy.plan(NO_OFFER, PROSE)
        policy.observe(0, 0, 5.0, stopped=True)  # dropped before the first draft, an absurd time
    assert policy.acceptance.rates(policy.klass)[0] < before
    assert policy.shared.costs.observations == observations  # a stopped round is not timed


def test_a_floor_that_drops_every_draft_turns_drafting_off():
    policy = fresh(costs(0.007))
    for _ in range(200):
        plan = policy.plan(NO_OFFER, PROSE)
        policy.observe(0, 0, T_PLAIN + T_DRAFT, stopped=plan.k > 0)
    assert policy.plan(NO_OFFER, PROSE).k == 0


def test_step_costs_follow_the_median_of_real_rounds_not_their_stalls():
    """Rounds of ~40 ms with one in ten stalled at 200 ms: the price stays by the typical round."""
    from policies.cost import running_median

    probe = costs(per_row=0.008)
    rng = np.random.default_rng(0)
    for i in range(300):
        probe.observe(1, 0.2 if i % 10 == 9 else 0.040 + rng.normal(0, 0.002))
    assert abs(probe.seconds[1] - 0.040) < 0.003  # a mean would sit near 0.056
    for _ in range(100):  # the rounds get slower for good (a longer context): the price follows
        probe.observe(1, 0.060)
    assert abs(probe.seconds[1] - 0.060) < 1e-9
    assert running_median(1.0, 1.01, 0.02) == 1.01 and running_median(1.0, 0.5, 0.02) == 0.98

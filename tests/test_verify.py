import mlx.core as mx
import numpy as np
import pytest

from daemon.engine.ties import NearTieGuard
from daemon.engine.verify import residual_logprobs, sampled_accepted, verify_greedy
from policies.classifier import PROSE
from policies.plan import NO_OFFER
from policies.registry import make_policy


def test_greedy_accepts_the_agreeing_prefix_then_emits_the_target_token():
    def rows(argmaxes):
        return mx.array([[10.0 if v == a else 0.0 for v in range(12)] for a in argmaxes])

    guard = NearTieGuard(model=None, margin=1e-3)  # margins of 10: never a recomputation
    assert verify_greedy(rows([5, 6, 9, 1]), [5, 6, 7], guard, []) == [5, 6, 9]
    assert verify_greedy(rows([4, 6, 7, 1]), [5, 6, 7], guard, []) == [4]
    assert verify_greedy(rows([5, 6, 7, 1]), [5, 6, 7], guard, []) == [5, 6, 7, 1]  # the bonus token
    assert guard.rechecks == 0


def test_sampled_acceptance_ratio():
    # p/q = 0.5 at the first draft: u = 0.4 accepts, u = 0.6 rejects
    assert sampled_accepted([0.2, 0.9], [0.4, 0.3], [0.4, 0.99]) == 2
    assert sampled_accepted([0.2, 0.9], [0.4, 0.3], [0.6, 0.0]) == 0
    assert sampled_accepted([0.0], [1.0], [0.0]) == 0  # p = 0 never accepts


def test_residual_is_normalized_positive_part():
    p = mx.array([0.5, 0.3, 0.2, 0.0])
    q = mx.array([0.7, 0.1, 0.2, 0.0])
    r = np.exp(np.array(residual_logprobs(p, q)))
    np.testing.assert_allclose(r, [0, 1, 0, 0], atol=1e-6)
    same = np.exp(np.array(residual_logprobs(p, p)))
    np.testing.assert_allclose(same, np.array(p), atol=1e-6)


def test_policy_names():
    assert make_policy("off").plan(NO_OFFER, PROSE).k == 0
    assert make_policy("fixed:6").plan(NO_OFFER, PROSE).k == 6 and make_policy("fixed:6").name == "fixed:6"
    for bad in ("fixed:0", "fixed:x", "fixed:17", "sometimes"):
        with pytest.raises(ValueError, match="policy"):
            make_policy(bad)


def test_adaptive_names_and_check():
    from policies.adaptive import SharedEstimates
    from policies.cost import StepCosts
    from policies.plan import Proposal
    from policies.registry import check

    shared = SharedEstimates(StepCosts(0.004, [0.07 + 0.008 * n for n in range(9)]))
    both, alone = make_policy("adaptive", shared), make_policy("adaptive:mtp", shared)
    assert (both.name, alone.name) == ("adaptive", "adaptive:mtp")
    offer = Proposal(tuple(range(8)), 4)
    assert both.plan(offer, PROSE).lookup  # the prior says a long copy pays
    assert not alone.plan(offer, PROSE).lookup
    for name in ("adaptive", "adaptive:mtp", "off", "fixed:3"):
        check(name)
    with pytest.raises(ValueError, match="policy"):
        check("adaptive:sometimes")
    with pytest.raises(ValueError, match="estimates"):
        make_policy("adaptive:mtp")

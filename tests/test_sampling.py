import math

import mlx.core as mx
import numpy as np
import pytest

from daemon.engine.sampling import SamplingParams, new_key, sample, target_logprobs

LOGITS = mx.array([[2.0, 1.0, 0.5, -1.0, 0.0]])


def probs(params):
    return np.exp(np.array(target_logprobs(LOGITS, params)))[0]


def test_temperature_scales_softmax():
    p = probs(SamplingParams(temperature=0.5))
    expected = np.exp(np.array(LOGITS)[0] / 0.5)
    np.testing.assert_allclose(p, expected / expected.sum(), rtol=1e-5)


def test_top_k_keeps_k_and_renormalizes():
    p = probs(SamplingParams(temperature=1.0, top_k=2))
    assert (p > 0).sum() == 2 and p[0] > p[1] > 0
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-5)


def test_top_p_keeps_smallest_nucleus():
    full = probs(SamplingParams(temperature=1.0))
    p = probs(SamplingParams(temperature=1.0, top_p=0.7))
    assert full[0] < 0.7 < full[0] + full[1]
    assert (p > 0).sum() == 2


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams(), new_key(0)).item() == 0


def test_samples_follow_the_distribution():
    params = SamplingParams(temperature=1.0, top_k=4)
    keys = mx.random.split(new_key(7), 4000)
    draws = np.array(mx.stack([sample(LOGITS[0], params, k) for k in keys]))
    expected = probs(params) * len(draws)
    observed = np.bincount(draws, minlength=5)
    assert observed[np.argmin(expected)] == 0  # the top-k mask holds
    mask = expected > 0
    chi2 = (((observed - expected)[mask]) ** 2 / expected[mask]).sum()
    assert chi2 < 16.3  # p = 0.001 with 3 degrees of freedom


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)])
def test_invalid_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)

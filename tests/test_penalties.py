"""Penalties and logit_bias (mlx-lm's logits processors): they change the answer, each verified row
is adjusted with the history up to its own position, and greedy speculation equals `off` with them."""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from doubles import RuleDrafter, planted_errors, target_logits
from mlx_lm.sample_utils import make_repetition_penalty

from daemon.engine.generate import generate
from daemon.engine.penalties import CONTEXT, adjusted, adjusted_rows, processors
from daemon.engine.records import Request
from daemon.engine.sampling import SamplingParams
from policies.fixed import Fixed

PROMPT = (1, 80, 120, 7, 200, 33, 150)
PENALISED = SamplingParams(presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3)


def run(lm, policy, sampling, n=40):
    return list(generate(lm, Request(PROMPT, n, sampling), policy))[-1].token_ids


def test_each_row_is_adjusted_with_its_own_history():
    procs = processors(SamplingParams(repetition_penalty=2.0))
    logits = mx.random.normal((3, 50), key=mx.random.key(0))
    history, drafts = [3, 4, 5], [7, 9]
    rows = adjusted_rows(procs, logits, history, drafts)
    for j in range(3):
        own = make_repetition_penalty(2.0, CONTEXT)(mx.array([*history, *drafts[:j]]), logits[j : j + 1])
        assert mx.array_equal(rows[j : j + 1], own)
    assert not mx.array_equal(rows[2], rows[0])  # row 2 also penalises the drafts 7 and 9
    assert mx.array_equal(adjusted(procs, logits[0], history), rows[:1])


def test_the_processors_leave_the_callers_logits_alone():
    logits = mx.zeros((1, 10))
    adjusted(processors(SamplingParams(repetition_penalty=2.0, logit_bias=((3, 5.0),))), logits, [1, 2])
    assert mx.array_equal(logits, mx.zeros((1, 10)))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_speculation_with_penalties_equals_off(tiny_lm, k):
    plain = run(tiny_lm, Fixed(0), PENALISED)
    assert plain != run(tiny_lm, Fixed(0), SamplingParams())  # the penalties change the answer
    vocab = tiny_lm.config["vocab_size"]
    for rule in (target_logits(tiny_lm.model), planted_errors(tiny_lm.model, set(range(0, 200, 3)), vocab)):
        lm = dataclasses.replace(tiny_lm, drafter=RuleDrafter(PROMPT[0], rule, 64), drafter_name="rule")
        assert run(lm, Fixed(k), PENALISED) == plain


def test_logit_bias_forces_a_token_with_and_without_drafts(tiny_lm):
    biased = SamplingParams(logit_bias=((42, 100.0),))
    lm = dataclasses.replace(tiny_lm, drafter=RuleDrafter(PROMPT[0], target_logits(tiny_lm.model), 64),
                             drafter_name="rule")
    for policy in (Fixed(0), Fixed(2)):
        assert np.all(np.array(run(lm, policy, biased, n=12)) == 42)

"""Constrained decoding: the grammar masks the target at every position; with speculation the
drafts are masked or cut and verification masks each row, so greedy ids equal constrained `off`."""

import dataclasses
import json

import jsonschema
import llguidance
import numpy as np
import pytest
from doubles import RuleDrafter, planted_errors, target_logits

from daemon.engine.generate import generate
from daemon.engine.records import Request
from daemon.engine.sampling import SamplingParams
from daemon.models.loading import load
from policies.fixed import Fixed

PROMPT = (1, 80, 120, 7, 200, 33, 150)
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                          "b": {"type": "string", "maxLength": 6}},
          "required": ["a", "b"], "additionalProperties": False}
GRAMMAR = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})


def run(lm, policy, sampling=SamplingParams(), grammar=GRAMMAR, n=60):
    return list(generate(lm, Request(PROMPT, n, sampling, grammar=grammar), policy))[-1]


def text(lm, done) -> str:
    return lm.tokenizer.decode(list(done.token_ids))


@pytest.fixture(scope="module")
def constrained_plain(tiny_lm):
    return run(tiny_lm, Fixed(0))


def test_the_answer_follows_the_schema(tiny_lm, constrained_plain):
    jsonschema.validate(json.loads(text(tiny_lm, constrained_plain)), SCHEMA)
    free = list(generate(tiny_lm, Request(PROMPT, 60), Fixed(0)))[-1]
    assert not text(tiny_lm, free).startswith("{")  # the random model left alone writes no JSON


@pytest.mark.parametrize("k", [1, 2, 4])
def test_greedy_with_drafts_equals_constrained_off(tiny_lm, constrained_plain, k):
    vocab = tiny_lm.config["vocab_size"]
    for rule in (target_logits(tiny_lm.model), planted_errors(tiny_lm.model, set(range(0, 200, 3)), vocab)):
        lm = dataclasses.replace(tiny_lm, drafter=RuleDrafter(PROMPT[0], rule, 64), drafter_name="rule")
        done = run(lm, Fixed(k))
        assert done.token_ids == constrained_plain.token_ids and done.stats.drafted > 0


def test_a_real_mtp_drafter_and_the_lookup_under_a_grammar(tiny_gguf, constrained_plain):
    from daemon.engine.calibration import shared_estimates
    from policies.registry import make_policy

    lm = load(str(tiny_gguf), drafter="random")
    for policy in (Fixed(2), make_policy("adaptive", shared_estimates(lm, None))):
        assert run(lm, policy).token_ids == constrained_plain.token_ids


def test_sampling_under_a_grammar_stays_in_it_with_and_without_drafts(tiny_lm):
    lm = dataclasses.replace(tiny_lm, drafter=RuleDrafter(PROMPT[0], target_logits(tiny_lm.model), 64),
                             drafter_name="rule")
    for seed in range(4):
        for policy in (Fixed(0), Fixed(3)):
            done = run(lm, policy, SamplingParams(1.0, seed=seed))
            jsonschema.validate(json.loads(text(lm, done)), SCHEMA)
    same = [run(lm, Fixed(0), SamplingParams(1.0, seed=9)).token_ids for _ in range(2)]
    assert same[0] == same[1]  # seeded


def test_the_draft_masks_cover_every_row(tiny_lm):
    """A drafter that always proposes the same forbidden token gets masked: no draft is ever one
    the grammar forbids, so none is counted as drafted and rejected for it."""
    import mlx.core as mx

    vocab = tiny_lm.config["vocab_size"]
    lm = dataclasses.replace(tiny_lm, drafter=RuleDrafter(PROMPT[0], lambda prefix: mx.zeros(vocab).at[5].add(30.0),
                                                          64), drafter_name="rule")
    done = run(lm, Fixed(2))
    assert done.token_ids == run(tiny_lm, Fixed(0)).token_ids
    assert np.all(np.array(done.token_ids) != 5)


def test_a_drafter_that_can_offer_no_allowed_token_stops_drafting(tiny_lm, constrained_plain):
    """A drafter head over part of the vocabulary (the shipped drafter's 8,192 rows) may have no
    token the grammar allows: the draft is dropped, not filled with a forbidden one (that was a crash)."""
    import mlx.core as mx

    vocab = tiny_lm.config["vocab_size"]
    only_low = mx.where(mx.arange(vocab) < 3, 0.0, -mx.inf)  # tokens 0..2: specials the schema never allows
    lm = dataclasses.replace(tiny_lm, drafter=RuleDrafter(PROMPT[0], lambda prefix: only_low, 64), drafter_name="rule")
    done = run(lm, Fixed(2))
    assert done.token_ids == constrained_plain.token_ids


def test_forced_call_arguments_take_only_the_declared_properties():
    from daemon.server.structured import tool_call_grammar

    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}}
    grammar = tool_call_grammar([tool], "f", "</tool_call>")
    lark = grammar.split("%json ", 1)[1].split("\n")[0].rsplit(" ", 1)[0]
    assert json.loads(lark)["additionalProperties"] is False
    tool["function"]["parameters"]["additionalProperties"] = {"type": "string"}  # the schema's own word stands
    lark = tool_call_grammar([tool], "f", "</tool_call>").split("%json ", 1)[1].split("\n")[0].rsplit(" ", 1)[0]
    assert json.loads(lark)["additionalProperties"] == {"type": "string"}


OPEN = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"},
                                        "c": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
        "required": ["a", "b", "c"], "additionalProperties": False}  # unbounded: the random model never ends it


@pytest.mark.parametrize("n", [40, 57, 80])
def test_an_answer_out_of_room_ends_valid_alike_under_every_policy(tiny_lm, n):
    """Cut where the room runs out, the answer would be half an object; it is completed in the
    room instead (a string closed, the missing keys given short values), ending "length"."""
    grammar = llguidance.LLMatcher.grammar_from_json_schema(OPEN, defaults={"whitespace_flexible": False})
    plain = run(tiny_lm, Fixed(0), grammar=grammar, n=n)
    value = json.loads(text(tiny_lm, plain))
    jsonschema.validate(value, OPEN)
    assert plain.finish_reason == "length" and plain.completion_tokens <= n
    vocab = tiny_lm.config["vocab_size"]
    for rule in (target_logits(tiny_lm.model), planted_errors(tiny_lm.model, set(range(0, 200, 3)), vocab)):
        lm = dataclasses.replace(tiny_lm, drafter=RuleDrafter(PROMPT[0], rule, 64), drafter_name="rule")
        assert run(lm, Fixed(3), grammar=grammar, n=n).token_ids == plain.token_ids


def test_a_completion_from_where_the_grammar_is(tiny_lm):
    from daemon.engine.grammar import Grammar

    g = Grammar(tiny_lm.tokenizer, llguidance.LLMatcher.grammar_from_json_schema(OPEN), tiny_lm.config["vocab_size"])
    g.advance(tiny_lm.tokenizer._tokenizer.encode('{"a": 12, "b": "half a sent', add_special_tokens=False))
    walk = g.closing(40)
    done = '{"a": 12, "b": "half a sent' + tiny_lm.tokenizer.decode(walk)
    jsonschema.validate(json.loads(done), OPEN)
    assert g.closing(len(walk) - 1) is None  # no shorter one within its limit
    assert not g.matcher.is_accepting()  # it walked a copy

"""A conversation's next turn takes its previous prompt from the prompt cache: on hybrid models too
(recurrent layers kept whole where a next turn agrees), and past the billing line Claude Code
starts its system prompt with. Requests are prepared as the server prepares them."""

import pytest
from families import write_family
from mlx_lm.models.cache import make_prompt_cache
from tiny import CHATML

from daemon.engine.generate import generate
from daemon.engine.prompt_cache import PromptCache, cacheable
from daemon.models.loading import load
from daemon.server.anthropic_shapes import MessagesRequest
from daemon.server.openai_shapes import ChatRequest
from daemon.server.prepare import prepare, without_billing_header
from daemon.server.worker import ServedModel
from daemon.settings import Settings
from policies.fixed import Fixed

MB = 1 << 20
SYSTEM = " ".join(f"rule {i}." for i in range(68))  # ~600 tokens: the byte-level tokenizer makes the turns long
# A template whose generation prompt opens reasoning that the answer, once in the history, leaves out
# (as Qwen3.5's does): the previous prompt as a whole is then no prefix of the next one.
THINKING = CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
HEADER = "x-anthropic-billing-header: cc_version=2.1.328.abc; cc_entrypoint=cli; cch={};"


@pytest.fixture(scope="module")
def recurrent(tmp_path_factory, tiny_lm):
    root, vocab = tmp_path_factory.mktemp("turns"), tiny_lm.config["vocab_size"]
    return {f: load(str(write_family(root / f, f, tiny_lm.tokenizer, vocab, seed=2))) for f in ("qwen3_5", "nemotron_h")}


def run(lm, body, cache, settings=None):
    """The engine's Finished record for a request body (greedy), and its prepared Request."""
    settings = settings or Settings(prompt_cache_disk_bytes=0)
    request = prepare(body, ServedModel.of(lm), settings).request
    return list(generate(lm, request, Fixed(0), prompt_cache=cache))[-1], request


def chat(messages) -> ChatRequest:
    return ChatRequest.model_validate({"messages": messages, "max_tokens": 10, "temperature": 0})


@pytest.mark.parametrize("template", [CHATML, THINKING], ids=["chatml", "thinking"])
@pytest.mark.parametrize("family", ["qwen3_5", "nemotron_h"])
def test_second_turn_reuses_the_first_on_a_hybrid_model(recurrent, family, template):
    lm = recurrent[family]
    lm.tokenizer.chat_template = template
    assert cacheable(make_prompt_cache(lm.model))
    cache = PromptCache(512 * MB)
    turn_1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
    first, _ = run(lm, chat(turn_1), cache)
    answer = lm.tokenizer.decode(list(first.token_ids))
    turn_2 = [*turn_1, {"role": "assistant", "content": answer}, {"role": "user", "content": "More?"}]
    second, request = run(lm, chat(turn_2), cache)
    plain, _ = run(lm, chat(turn_2), None)
    assert first.cached_tokens == 0 and first.prompt_tokens > 500
    assert second.cached_tokens >= 0.9 * second.prompt_tokens
    assert second.token_ids == plain.token_ids
    again, _ = run(lm, chat(turn_2), cache)  # the same prompt again: from the turn's end before its answer
    assert again.cached_tokens == max(request.marks) and again.token_ids == plain.token_ids


def test_recurrent_states_are_bounded_and_survive_later_turns(recurrent):
    lm = recurrent["qwen3_5"]
    lm.tokenizer.chat_template = THINKING
    one = PromptCache(512 * MB)
    run(lm, chat([{"role": "user", "content": SYSTEM}]), one)
    (entry,) = one._memory.values()
    assert len(entry.states) == 2 and any(k is None for k in entry.keys)  # at the mark and the end
    kept = [[a.tolist() for a in layer] for layer in entry.states[min(entry.states)]]
    bound = int(one.nbytes * 1.5)
    cache = PromptCache(bound)
    for word in ("one", "two", "three"):
        run(lm, chat([{"role": "user", "content": f"{word} {SYSTEM}"}]), cache)
    assert cache.nbytes <= bound and len(cache._memory) == 1
    run(lm, chat([{"role": "user", "content": SYSTEM}, {"role": "assistant", "content": "ok"},
                  {"role": "user", "content": "more"}]), one)
    assert [[a.tolist() for a in layer] for layer in entry.states[min(entry.states)]] == kept


def test_a_hybrid_system_prompt_persists_across_restarts(recurrent, tmp_path):
    lm = recurrent["qwen3_5"]
    lm.tokenizer.chat_template = CHATML
    turn = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
    plain, request = run(lm, chat(turn), None)
    run(lm, chat([*turn[:1], {"role": "user", "content": "Hello"}]), PromptCache(512 * MB, tmp_path, 512 * MB))
    done, _ = run(lm, chat(turn), PromptCache(512 * MB, tmp_path, 512 * MB))
    assert done.cached_tokens == request.persist_prefix > 0 and done.token_ids == plain.token_ids


def anthropic(cch: str) -> MessagesRequest:
    return MessagesRequest.model_validate({
        "model": "tiny", "max_tokens": 16, "temperature": 0,
        "system": [{"type": "text", "text": HEADER.format(cch)}, {"type": "text", "text": SYSTEM}],
        "messages": [{"role": "user", "content": "Add a function sub(a, b) to calc.py"}]})


@pytest.mark.parametrize("strip", [True, False])
def test_billing_header_does_not_defeat_the_cache(tiny_lm, strip):
    settings = Settings(prompt_cache_disk_bytes=0, strip_billing_header=strip)
    cache = PromptCache(512 * MB)
    run(tiny_lm, anthropic("1a2b3").chat(), cache, settings)
    second, request = run(tiny_lm, anthropic("9f8e7").chat(), cache, settings)
    if strip:
        assert second.cached_tokens >= 0.9 * second.prompt_tokens
        assert "billing" not in tiny_lm.tokenizer.decode(list(request.prompt_ids))
    else:
        assert second.cached_tokens < 0.2 * second.prompt_tokens  # it runs again from the header's cch= on


def test_without_billing_header():
    system = {"role": "system", "content": HEADER.format("1a2b3") + "You are Claude Code."}
    user = {"role": "user", "content": HEADER.format("1a2b3")}
    assert without_billing_header([system, user]) == [{"role": "system", "content": "You are Claude Code."}, user]
    on_its_line = {"role": "system", "content": HEADER.format("1a2b3") + "\nYou are Claude Code."}
    assert without_billing_header([on_its_line])[0]["content"] == "You are Claude Code."
    assert without_billing_header([{"role": "system", "content": HEADER.format("1a2b3")}, user]) == [user]
    plain = [{"role": "system", "content": "Mention x-anthropic-billing-header: a=b; freely."}, user]
    assert without_billing_header(plain) == plain

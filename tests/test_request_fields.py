"""No request field is silently ignored: every field OpenAI's API reference documents for chat
completions is applied by mtpd, accepted as a hint and named in the unused-hints header, or refused
with a 400 naming it."""

import pytest
from test_server_app import FakeWorker, app_with, chat_body

from daemon.server.hints import HEADER

# Every documented request field with a value that would change the answer if applied.
DOCUMENTED = {
    "model": "tiny", "max_tokens": 3, "max_completion_tokens": 3, "temperature": 0.5, "top_p": 0.5, "seed": 7,
    "stop": ["x"], "stream": False, "stream_options": None, "n": 1, "logprobs": True, "top_logprobs": 2,
    "user": "u1", "metadata": {"k": "v"}, "safety_identifier": "s", "prompt_cache_key": "c", "service_tier": "auto",
    "store": False, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "none", "parallel_tool_calls": False, "frequency_penalty": 0.5, "presence_penalty": 0.5,
    "logit_bias": {"50": 5}, "reasoning_effort": "low",
    # documented, not applied: refused unless at their defaults
    "n_2": 2, "store_true": True,
    "service_tier_flex": "flex", "audio": {"voice": "alloy", "format": "mp3"}, "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"}, "reasoning_effort_x": "extreme", "verbosity": "low",
    "web_search_options": {}, "functions": [{"name": "f"}], "function_call": "auto",
    "response_format": {"type": "json_object"},
}
APPLIED = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
           "stream_options", "n", "logprobs", "top_logprobs", "store", "tools", "tool_choice", "parallel_tool_calls",
           "response_format", "frequency_penalty", "presence_penalty", "logit_bias"}
HINTS = {"user", "metadata", "safety_identifier", "prompt_cache_key", "service_tier", "reasoning_effort"}


def field(name: str) -> str:
    return name.split("_2")[0].removesuffix("_true").removesuffix("_flex").removesuffix("_x")


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
async def test_each_documented_field_is_applied_or_refused(aiohttp_client, name):
    worker = FakeWorker(context=4096)  # room for the tools' description
    client = await aiohttp_client(app_with(worker))
    extra = {"logprobs": True} if name == "top_logprobs" else {}
    r = await client.post("/v1/chat/completions", json=chat_body(**{field(name): DOCUMENTED[name]}, **extra))
    if name in APPLIED | HINTS:
        assert r.status == 200, await r.text()
        assert r.headers.get(HEADER) == (name if name in HINTS else None)
    else:
        assert r.status == 400
        error = (await r.json())["error"]
        assert error["param"] == field(name) and error["type"] == "invalid_request_error", error
    await client.close()


async def test_an_unknown_field_is_refused_by_name(aiohttp_client):
    client = await aiohttp_client(app_with())
    r = await client.post("/v1/chat/completions", json=chat_body(temprature=0.2))
    assert r.status == 400
    assert (await r.json())["error"] == {"message": "temprature: mtpd does not support this field", "type":
                                         "invalid_request_error", "param": "temprature", "code": None}
    await client.close()


async def test_applied_fields_reach_the_engine(aiohttp_client):
    worker = FakeWorker()
    client = await aiohttp_client(app_with(worker))
    r = await client.post("/v1/chat/completions", json=chat_body(
        max_completion_tokens=2, temperature=0.5, top_p=0.5, seed=7, stop=["x"], presence_penalty=0.5,
        frequency_penalty=-0.25, repetition_penalty=1.1, logit_bias={"50": 5, "7": -100}))
    assert r.status == 200
    request = worker.jobs[0].request
    s = request.sampling
    assert (request.max_tokens, s.temperature, s.top_p, s.seed, request.stop) == (2, 0.5, 0.5, 7, ("x",))
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.logit_bias) == (
        0.5, -0.25, 1.1, ((50, 5.0), (7, -100.0)))
    for bad, param in (({"logit_bias": {"999": 1}}, "logit_bias"), ({"logit_bias": {"a": 1}}, "logit_bias"),
                       ({"logit_bias": {"5": 101}}, "logit_bias.5"), ({"presence_penalty": 3}, "presence_penalty"),
                       ({"repetition_penalty": 0}, "repetition_penalty")):
        r = await client.post("/v1/chat/completions", json=chat_body(**bad))
        assert r.status == 400 and (await r.json())["error"]["param"] == param, (bad, await r.text())
    await client.close()

"""Tool calls: the tools reach the prompt (the model's template or the generic format), calls are
read back out of the answer streamed or not, in OpenAI's shapes."""

import json

import pytest
from test_server_app import FakeWorker, app_with

from daemon.engine.records import Delta, Finished, SpecStats
from daemon.models.prompts import GENERIC_END, GENERIC_START
from daemon.server.tool_calls import ToolCalls, ToolFormat, _parse_generic

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
GENERIC = ToolFormat(GENERIC_START, GENERIC_END, _parse_generic)


def events(calls: ToolCalls, text: str, piece: int) -> list:
    out = []
    for i in range(0, len(text), piece):
        out += calls.feed(text[i : i + piece])
    return out + calls.close()


@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_calls_read_out_of_streamed_text_whatever_the_pieces(piece):
    got = events(ToolCalls(GENERIC, [WEATHER]), "Let me check." + CALL + "\n" + CALL.replace("Paris", "Rome"), piece)
    text = "".join(v for k, v in got if k == "text")
    calls = [v for k, v in got if k == "call"]
    assert text == "Let me check."
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert all(c["type"] == "function" and c["function"]["name"] == "get_weather" and c["id"].startswith("call_")
               for c in calls)


def test_text_that_only_looks_like_a_call_stays_text():
    for text in ("a < b and <tool_call>not json</tool_call>", "ends with <tool_ca"):
        got = events(ToolCalls(GENERIC, []), text, 2)
        assert {k for k, _ in got} == {"text"} and "".join(v for _, v in got) == text


def test_one_call_only_without_parallel_calls_and_an_open_call_at_the_end():
    got = events(ToolCalls(GENERIC, [WEATHER], parallel=False), CALL + CALL, 5)
    assert [k for k, _ in got] == ["call"]
    forced = ToolCalls(GENERIC, [WEATHER], opened=True, prefix='\n{"name": "get_weather", "arguments": ')
    got = events(forced, '{"city": "Oslo"}}', 2)  # the model stopped before </tool_call>
    assert [(k, json.loads(v["function"]["arguments"])) for k, v in got] == [("call", {"city": "Oslo"})]


def scripted(text: str):
    """A fake engine answer: `text` one character per step (the fake tokenizer's ids)."""

    def answer(job):
        yield from (Delta((ord(c),), c) for c in text)
        yield Finished("stop", len(job.request.prompt_ids), len(text), 0, 0.01, 0.02, SpecStats(),
                       tuple(ord(c) for c in text))

    return answer


def prompt_of(worker) -> str:
    return "".join(chr(i) for i in worker.jobs[-1].request.prompt_ids)


async def test_tools_reach_the_prompt_and_calls_come_back(aiohttp_client):
    worker = FakeWorker(answer=scripted("Checking." + CALL), context=4096)
    client = await aiohttp_client(app_with(worker))
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER]}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status == 200, await r.text()
    choice = (await r.json())["choices"][0]
    assert "<tools>" in prompt_of(worker) and '"name": "get_weather"' in prompt_of(worker)
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Checking."
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}

    r = await client.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = [json.loads(line[6:]) for line in (await r.text()).splitlines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    (streamed,) = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert streamed["index"] == 0 and streamed["function"]["name"] == "get_weather"
    assert json.loads(streamed["function"]["arguments"]) == {"city": "Paris"}
    assert "".join(d.get("content") or "" for d in deltas) == "Checking."
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_tool_choice_and_the_tool_result_turn(aiohttp_client):
    worker = FakeWorker(answer=scripted('{"city": "Paris"}}'), context=4096)
    client = await aiohttp_client(app_with(worker))
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = await client.post("/v1/chat/completions", json={"messages": ask, "tools": [WEATHER], "tool_choice": named})
    assert prompt_of(worker).endswith('<tool_call>\n{"name": "get_weather", "arguments": ')
    (call,) = (await r.json())["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}

    await client.post("/v1/chat/completions", json={"messages": ask, "tools": [WEATHER], "tool_choice": "required"})
    assert prompt_of(worker).endswith("<tool_call>\n")
    await client.post("/v1/chat/completions", json={"messages": ask, "tools": [WEATHER], "tool_choice": "none"})
    assert "<tools>" not in prompt_of(worker)

    turn = ask + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    r = await client.post("/v1/chat/completions", json={"messages": turn, "tools": [WEATHER]})
    assert r.status == 200
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in prompt_of(worker) and '"city": "Paris"' in prompt_of(worker)


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
])
async def test_bad_tool_requests_are_400_naming_the_field(aiohttp_client, body, param):
    client = await aiohttp_client(app_with(FakeWorker(context=4096)))
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status == 400 and (await r.json())["error"]["param"] == param, await r.text()


async def test_structured_output_and_forced_calls_carry_a_grammar(aiohttp_client):
    worker = FakeWorker(answer=scripted('{"city": "Paris"}}'), context=4096)
    client = await aiohttp_client(app_with(worker))
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    schema = {"name": "w", "schema": {"type": "object", "properties": {"t": {"type": "number"}}}}
    r = await client.post("/v1/chat/completions", json={"messages": ask, "response_format": {
        "type": "json_schema", "json_schema": schema}})
    assert r.status == 200 and '"t"' in worker.jobs[-1].request.grammar
    await client.post("/v1/chat/completions", json={"messages": ask, "response_format": {"type": "json_object"}})
    assert worker.jobs[-1].request.grammar
    await client.post("/v1/chat/completions", json={"messages": ask})
    assert worker.jobs[-1].request.grammar is None
    await client.post("/v1/chat/completions", json={"messages": ask, "tools": [WEATHER], "tool_choice": "required"})
    assert 'get_weather' in worker.jobs[-1].request.grammar and "</tool_call>" in worker.jobs[-1].request.grammar
    await client.post("/v1/chat/completions", json={"messages": ask, "tools": [WEATHER]})
    assert worker.jobs[-1].request.grammar is None  # "auto": the model decides
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 5}}}
    r = await client.post("/v1/chat/completions", json={"messages": ask, "response_format": bad})
    assert r.status == 400 and (await r.json())["error"]["param"].startswith("response_format")

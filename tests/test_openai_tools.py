"""Tool calls and structured output through the official `openai` client: parsing and shapes against
the app with a scripted engine (parallel calls, streamed and not, a tool result turn), then forced
calls and JSON schemas on a real daemon, lossless under speculation."""

import json

import jsonschema
import openai
import pytest
from test_server_app import FakeWorker, app_with
from test_tool_calls import CALL, WEATHER, prompt_of, scripted

LIGHT = {"type": "function", "function": {"name": "set_light", "description": "Switch a light", "parameters": {
    "type": "object", "properties": {"room": {"enum": ["hall", "kitchen"]}, "on": {"type": "boolean"}},
    "required": ["room", "on"], "additionalProperties": False}}}  # bounded: a random model ends it in time
ASK = [{"role": "user", "content": "Weather in Paris and Rome?"}]


async def scripted_client(aiohttp_client, text: str):
    worker = FakeWorker(answer=scripted(text), context=4096)
    server = await aiohttp_client(app_with(worker))
    return worker, openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="none", max_retries=0)


async def test_parallel_calls_streamed_and_not(aiohttp_client):
    two = "Checking both." + CALL + "\n" + CALL.replace("Paris", "Rome")
    worker, client = await scripted_client(aiohttp_client, two)
    answer = await client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER])
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls" and message.content == "Checking both."
    assert [json.loads(c.function.arguments)["city"] for c in message.tool_calls] == ["Paris", "Rome"]
    assert len({c.id for c in message.tool_calls}) == 2

    stream = await client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], stream=True)
    calls, text, finish = {}, "", None
    async for chunk in stream:
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": call.id, "name": call.function.name, "arguments": ""})
            entry["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert text == "Checking both." and finish == "tool_calls" and sorted(calls) == [0, 1]
    assert [json.loads(calls[i]["arguments"]) for i in (0, 1)] == [{"city": "Paris"}, {"city": "Rome"}]
    assert all(c["id"].startswith("call_") and c["name"] == "get_weather" for c in calls.values())

    one = await client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1


async def test_a_tool_result_turn_through_the_client(aiohttp_client):
    worker, client = await scripted_client(aiohttp_client, "It is 18 C and sunny in Paris.")
    turn = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_7", "content": "18 C, sunny"}]
    answer = await client.chat.completions.create(model="tiny", messages=turn, tools=[WEATHER])
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.tool_calls is None
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in prompt_of(worker)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "set_light"}}])
def test_forced_calls_validate_and_are_lossless(tiny_daemon, choice):
    client = tiny_daemon.client()
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Lights on in the hall."}], tools=[WEATHER, LIGHT],
              tool_choice=choice, max_tokens=120, temperature=0)
    answers = {}
    for spec in ("off", "fixed:2", "adaptive"):
        answer = client.chat.completions.create(**kw, extra_body={"speculation": spec})
        (call,) = answer.choices[0].message.tool_calls
        schema = {"get_weather": WEATHER, "set_light": LIGHT}[call.function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)
        assert answer.choices[0].finish_reason == "tool_calls"
        answers[spec] = (call.function.name, call.function.arguments)
    assert len(set(answers.values())) == 1, answers
    if choice != "required":
        assert answers["off"][0] == "set_light"
    streamed = client.chat.completions.create(**kw, stream=True, extra_body={"speculation": "fixed:2"})
    parts = [c.choices[0].delta.tool_calls[0] for c in streamed if c.choices and c.choices[0].delta.tool_calls]
    assert (parts[0].function.name, "".join(p.function.arguments for p in parts)) == answers["off"]


def test_response_format_json_schema_validates(tiny_daemon):
    schema = {"type": "object", "properties": {"room": {"enum": ["hall", "kitchen"]}, "ok": {"type": "boolean"},
                                               "n": {"enum": [1, 2, 3]}},
              "required": ["room", "ok", "n"], "additionalProperties": False}
    texts = set()
    for spec in ("off", "fixed:2"):
        answer = tiny_daemon.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "A room as JSON."}], max_tokens=60, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "room", "schema": schema, "strict": True}},
            extra_body={"speculation": spec})
        assert answer.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
        texts.add(answer.choices[0].message.content)
    assert len(texts) == 1
    loose = tiny_daemon.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "JSON please."}], max_tokens=40, temperature=0,
        response_format={"type": "json_object"})
    assert loose.choices[0].message.content.startswith("{")

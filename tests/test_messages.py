"""Anthropic's Messages API: in-process shapes (message, events, errors) with a scripted fake engine,
then the official `anthropic` client against a real daemon on the tiny model."""

import json

import anthropic
import jsonschema
import pytest
from test_server_app import FakeWorker, app_with
from test_tool_calls import CALL, prompt_of, scripted

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def sse_events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


async def test_a_message_with_text_and_a_tool_use_block(aiohttp_client):
    worker = FakeWorker(answer=scripted("Checking." + CALL), context=4096)
    client = await aiohttp_client(app_with(worker))
    body = {"model": "tiny", "max_tokens": 200, "system": "Be brief.", "messages": ASK, "tools": [WEATHER]}
    r = await client.post("/v1/messages", json=body)
    assert r.status == 200, await r.text()
    message = await r.json()
    assert message["type"] == "message" and message["role"] == "assistant" and message["id"].startswith("msg_")
    text, use = message["content"]
    assert text == {"type": "text", "text": "Checking."}
    assert use["type"] == "tool_use" and use["name"] == "get_weather" and use["input"] == {"city": "Paris"}
    assert use["id"].startswith("toolu_")
    assert message["stop_reason"] == "tool_use" and message["stop_sequence"] is None
    assert message["usage"]["input_tokens"] == len(worker.jobs[-1].request.prompt_ids)
    assert message["usage"]["output_tokens"] == len("Checking." + CALL)
    prompt = prompt_of(worker)
    assert prompt.index("Be brief.") < prompt.index("Weather in Paris?") and '"name": "get_weather"' in prompt


async def test_the_stream_is_anthropics_event_sequence(aiohttp_client):
    client = await aiohttp_client(app_with(FakeWorker(answer=scripted("Checking." + CALL), context=4096)))
    body = {"model": "tiny", "max_tokens": 200, "messages": ASK, "tools": [WEATHER], "stream": True}
    r = await client.post("/v1/messages", json=body)
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(await r.text())
    names = [e for e, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in events)
    text_deltas = sum(1 for e, d in events if e == "content_block_delta" and d["index"] == 0)
    block = ["content_block_start", "content_block_delta", "content_block_stop"]
    assert names == ["message_start", *block[:1], *block[1:2] * text_deltas, *block[2:], *block,
                     "message_delta", "message_stop"]
    starts = [d["content_block"] for e, d in events if e == "content_block_start"]
    assert [b["type"] for b in starts] == ["text", "tool_use"] and starts[1]["name"] == "get_weather"
    deltas = [d for e, d in events if e == "content_block_delta"]
    assert "".join(d["delta"]["text"] for d in deltas if d["index"] == 0) == "Checking."
    (arguments,) = [d["delta"]["partial_json"] for d in deltas if d["index"] == 1]
    assert json.loads(arguments) == {"city": "Paris"}
    assert [d["index"] for e, d in events if e == "content_block_stop"] == [0, 1]
    end = events[-2][1]
    assert end["delta"]["stop_reason"] == "tool_use" and end["usage"]["output_tokens"] == len("Checking." + CALL)


async def test_tool_use_and_tool_result_turns_reach_the_prompt(aiohttp_client):
    worker = FakeWorker(answer=scripted("18 C."), context=4096)
    client = await aiohttp_client(app_with(worker))
    turn = ASK + [
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [{"type": "text", "text": "18 C, sunny"}]},
                                     {"type": "text", "text": "And tomorrow?", "cache_control": {"type": "ephemeral"}}]}]
    r = await client.post("/v1/messages", json={"model": "tiny", "max_tokens": 20, "messages": turn,
                                                "tools": [WEATHER]})
    assert r.status == 200, await r.text()
    prompt = prompt_of(worker)
    assert '"city": "Paris"' in prompt and "<tool_response>\n18 C, sunny\n</tool_response>" in prompt
    assert prompt.index("18 C, sunny") < prompt.index("And tomorrow?")
    assert (await r.json())["stop_reason"] == "end_turn"


async def test_tool_choice_forces_a_call(aiohttp_client):
    worker = FakeWorker(answer=scripted('{"city": "Paris"}}'), context=4096)
    client = await aiohttp_client(app_with(worker))
    body = {"model": "tiny", "max_tokens": 50, "messages": ASK, "tools": [WEATHER],
            "tool_choice": {"type": "tool", "name": "get_weather"}}
    message = await (await client.post("/v1/messages", json=body)).json()
    assert prompt_of(worker).endswith('<tool_call>\n{"name": "get_weather", "arguments": ')
    assert worker.jobs[-1].request.grammar is not None
    assert [b["type"] for b in message["content"]] == ["tool_use"] and message["stop_reason"] == "tool_use"
    await client.post("/v1/messages", json={**body, "tool_choice": {"type": "any"}})
    assert prompt_of(worker).endswith("<tool_call>\n")
    await client.post("/v1/messages", json={**body, "tool_choice": {"type": "none"}})
    assert "<tools>" not in prompt_of(worker)


@pytest.mark.parametrize("body, status, kind, words", [
    ({"messages": ASK}, 400, "invalid_request_error", "max_tokens: Field required"),
    ({"max_tokens": 5, "messages": ASK, "container": "x"}, 400, "invalid_request_error", "container: mtpd does not"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400,
     "invalid_request_error", "messages.0.content"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": "x"}]}, *ASK]}, 400, "invalid_request_error",
     "system messages hold text blocks only"),
    ({"max_tokens": 5, "messages": ASK, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400,
     "invalid_request_error", "tools.0"),
    ({"max_tokens": 5, "messages": ASK, "temperature": 1.5}, 400, "invalid_request_error", "temperature"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "n", "input": {}}]}]}, 400, "invalid_request_error", "assistant"),
    ({"max_tokens": 5, "messages": [*ASK, {"role": "assistant", "content": "It is"}]}, 400,
     "invalid_request_error", "prefilled"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": "Be brief."}]}, 400, "invalid_request_error",
     "no user message"),
    ({"max_tokens": 5, "messages": ASK, "speed": "fast"}, 400, "invalid_request_error", "speed"),
    ({"model": "other", "max_tokens": 5, "messages": ASK}, 404, "not_found_error", "does not exist"),
])
async def test_errors_in_anthropics_shape(aiohttp_client, body, status, kind, words):
    client = await aiohttp_client(app_with(FakeWorker(context=4096)))
    r = await client.post("/v1/messages", json={"model": "tiny", **body})
    assert r.status == status
    error = await r.json()
    assert error["type"] == "error" and error["error"]["type"] == kind and words in error["error"]["message"], error


async def test_x_api_key_and_count_tokens(aiohttp_client):
    worker = FakeWorker(context=4096)
    client = await aiohttp_client(app_with(worker, api_key="sekret"))
    body = {"model": "tiny", "messages": ASK}
    r = await client.post("/v1/messages/count_tokens", json=body)
    assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"
    r = await client.post("/v1/messages/count_tokens", json=body, headers={"x-api-key": "sekret"})
    counted = (await r.json())["input_tokens"]
    r = await client.post("/v1/messages", json={**body, "max_tokens": 3}, headers={"x-api-key": "sekret"})
    assert r.status == 200 and counted == len(worker.jobs[-1].request.prompt_ids)


# -- the official client against a real daemon ------------------------------------------------------


def anthropic_client(daemon) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=daemon.url, api_key="none", max_retries=0)


def test_official_client_greedy_matches_openai_and_streams_the_same(tiny_daemon):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    client = anthropic_client(tiny_daemon)
    greedy = {"extra_body": {"temperature": 0}}  # the current API has no temperature; older clients send it
    one = client.messages.create(model="tiny", max_tokens=24, messages=messages, system="Be kind.", **greedy)
    openai_answer = tiny_daemon.client().chat.completions.create(
        model="tiny", max_tokens=24, temperature=0,
        messages=[{"role": "system", "content": "Be kind."}, *messages])
    assert one.content[0].text == openai_answer.choices[0].message.content
    assert one.usage.output_tokens == openai_answer.usage.completion_tokens
    assert one.stop_reason == ("max_tokens" if one.usage.output_tokens == 24 else "end_turn")
    with client.messages.stream(model="tiny", max_tokens=24, messages=messages, system="Be kind.", **greedy) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == one.content[0].text and final.usage.output_tokens == one.usage.output_tokens

    cut = one.content[0].text[5:9]
    stopped = client.messages.create(model="tiny", max_tokens=24, messages=messages, system="Be kind.",
                                     stop_sequences=[cut], **greedy)
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == cut
    assert one.content[0].text.startswith(stopped.content[0].text) and cut not in stopped.content[0].text


def test_official_client_forced_tool_use_validates_and_errors_raise(tiny_daemon):
    client = anthropic_client(tiny_daemon)
    tool = {"name": "set_light", "description": "Switch a light",  # bounded: a random model ends it in time
            "input_schema": {"type": "object", "properties": {"room": {"enum": ["hall", "kitchen"]},
                                                              "on": {"type": "boolean"}},
                             "required": ["room", "on"], "additionalProperties": False}}
    for spec in ("off", "fixed:2"):
        message = client.messages.create(model="tiny", max_tokens=60, tools=[tool],
                                          tool_choice={"type": "tool", "name": "set_light"},
                                          extra_body={"speculation": spec, "temperature": 0},
                                          messages=[{"role": "user", "content": "Lights on in the hall."}])
        (use,) = [b for b in message.content if b.type == "tool_use"]
        assert use.name == "set_light" and message.stop_reason == "tool_use"
        jsonschema.validate(use.input, tool["input_schema"])
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
              "required": ["city", "days"], "additionalProperties": False}
    answer = client.messages.create(model="tiny", max_tokens=80, output_config={"format": {"type": "json_schema",
                                                                                           "schema": schema}},
                                    messages=[{"role": "user", "content": "Plan a trip."}],
                                    extra_body={"speculation": "fixed:2", "temperature": 0})
    if answer.stop_reason == "end_turn":  # a random tiny model may run out of tokens inside a string
        jsonschema.validate(json.loads(answer.content[0].text), schema)
    else:
        assert answer.content[0].text.startswith("{")
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="tiny", max_tokens=5, messages=[])
    assert e.value.body["error"]["type"] == "invalid_request_error"

"""OpenAI's Responses API (POST /v1/responses): in-process shapes (response, events, errors, the kept
responses) with a scripted fake engine, then the official `openai` client against a real daemon on
the tiny model."""

import json

import jsonschema
import openai
import pytest
from test_messages import sse_events
from test_server_app import FakeWorker, app_with
from test_tool_calls import CALL, prompt_of, scripted

from daemon.server.keys import RESPONSES
from daemon.server.response_store import ResponseStore
from daemon.server.responses_shapes import MessageItem

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def body(**kw) -> dict:
    return {"model": "tiny", "input": "Weather in Paris?", **kw}


async def test_a_response_with_a_message_and_a_function_call(aiohttp_client):
    worker = FakeWorker(answer=scripted("Checking." + CALL), context=4096)
    client = await aiohttp_client(app_with(worker))
    r = await client.post("/v1/responses", json=body(instructions="Be brief.", tools=[WEATHER], temperature=0.5))
    assert r.status == 200, await r.text()
    got = await r.json()
    assert got["object"] == "response" and got["id"].startswith("resp_") and got["status"] == "completed"
    assert "output_text" not in got and got["incomplete_details"] is None
    message, call = got["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["id"].startswith("msg_")
    assert message["content"] == [{"type": "output_text", "text": "Checking.", "annotations": [], "logprobs": []}]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["id"].startswith("fc_")
    assert json.loads(call["arguments"]) == {"city": "Paris"} and call["call_id"].startswith("call_")
    prompt_tokens = len(worker.jobs[-1].request.prompt_ids)
    assert got["usage"] == {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                            "output_tokens": len("Checking." + CALL), "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": prompt_tokens + len("Checking." + CALL)}
    assert got["instructions"] == "Be brief." and got["tools"] == [WEATHER] and got["tool_choice"] == "auto"
    assert got["temperature"] == 0.5 and got["top_p"] == 1.0 and got["store"] is True
    assert got["text"] == {"format": {"type": "text"}} and got["parallel_tool_calls"] is True
    prompt = prompt_of(worker)
    assert prompt.index("Be brief.") < prompt.index("Weather in Paris?") and '"name": "get_weather"' in prompt


async def test_the_stream_is_the_responses_event_sequence_and_builds_the_same_output(aiohttp_client):
    client = await aiohttp_client(app_with(FakeWorker(answer=scripted("Checking." + CALL), context=4096)))
    r = await client.post("/v1/responses", json=body(tools=[WEATHER], stream=True))
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(await r.text())
    assert all(data["type"] == name for name, data in events)
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    names = [name.removeprefix("response.") for name, _ in events]
    deltas = names.count("output_text.delta")
    assert names == ["created", "in_progress", "output_item.added", "content_part.added",
                     *["output_text.delta"] * deltas, "output_text.done", "content_part.done", "output_item.done",
                     "output_item.added", "function_call_arguments.delta", "function_call_arguments.done",
                     "output_item.done", "completed"]
    data = [d for _, d in events]
    assert data[0]["response"]["status"] == "in_progress" and data[0]["response"]["output"] == []
    assert "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta") == "Checking."
    final = data[-1]["response"]
    done_items = [d["item"] for d in data if d["type"] == "response.output_item.done"]
    assert final["output"] == done_items and [i["type"] for i in done_items] == ["message", "function_call"]
    message_id, call_id = (i["id"] for i in done_items)
    assert all(d["item_id"] == message_id for d in data if d["type"].startswith("response.output_text"))
    (arguments,) = [d for d in data if d["type"] == "response.function_call_arguments.done"]
    assert arguments["item_id"] == call_id and arguments["output_index"] == 1
    assert json.loads(arguments["arguments"]) == {"city": "Paris"}
    assert final["usage"]["output_tokens"] == len("Checking." + CALL)


async def test_function_call_items_and_their_outputs_reach_the_prompt(aiohttp_client):
    worker = FakeWorker(answer=scripted("18 C."), context=4096)
    client = await aiohttp_client(app_with(worker))
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "18 C, sunny"},
             {"role": "developer", "content": "Answer in Celsius."}]
    r = await client.post("/v1/responses", json=body(input=items, tools=[WEATHER]))
    assert r.status == 200, await r.text()
    prompt = prompt_of(worker)
    assert prompt.index("Let me look.") < prompt.index('"city": "Paris"') < prompt.index("18 C, sunny")
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in prompt and "Answer in Celsius." in prompt
    assert [i["type"] for i in (await r.json())["output"]] == ["message"]


async def test_a_cut_answer_is_incomplete_and_hints_are_reported(aiohttp_client):
    client = await aiohttp_client(app_with(FakeWorker(context=4096)))  # the fake echo ends on "length"
    r = await client.post("/v1/responses", json=body(max_output_tokens=2, reasoning={"effort": "high"},
                                                     metadata={"k": "v"}, truncation="auto", user="u"))
    got = await r.json()
    assert got["status"] == "incomplete" and got["incomplete_details"] == {"reason": "max_output_tokens"}
    assert got["output"][0]["status"] == "incomplete" and got["max_output_tokens"] == 2
    assert r.headers["x-mtpd-unused-hints"] == "metadata, user, reasoning, truncation"
    r = await client.post("/v1/responses", json=body(max_output_tokens=2, stream=True))
    assert [name for name, _ in sse_events(await r.text())][-1] == "response.incomplete"


async def test_codexs_request_shape_is_served(aiohttp_client):
    """What Codex sends (codex-cli 0.171): a namespace of function tools, a hosted web_search, encrypted
    reasoning asked for, its client_metadata: the namespace's tools are offered as any others (a
    call to one is made), the rest accepted and reported as unused."""
    worker = FakeWorker(answer=scripted(CALL), context=4096)
    client = await aiohttp_client(app_with(worker))
    namespace = {"type": "namespace", "name": "weather_v1", "description": "Weather tools",
                 "tools": [{**WEATHER, "strict": False}, {"type": "web_search"}]}
    r = await client.post("/v1/responses", json=body(
        tools=[namespace, {"type": "web_search", "search_context_size": "low"}],
        include=["reasoning.encrypted_content"],
        client_metadata={"session_id": "s"}, reasoning={"summary": "auto"}, store=False, stream=True))
    assert r.status == 200, await r.text()
    assert r.headers["x-mtpd-unused-hints"] == "tools (hosted), reasoning, include, client_metadata"
    final = sse_events(await r.text())[-1][1]["response"]
    assert [(i["type"], i.get("name")) for i in final["output"]] == [("function_call", "get_weather")]
    assert final["tools"][1] == {"type": "web_search", "search_context_size": "low"}
    prompt = prompt_of(worker)
    assert '"name": "get_weather"' in prompt and "web_search" not in prompt


@pytest.mark.parametrize("fields, param, words", [
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input", "item 0 has type 'input_image'"),
    ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]}, "input.0.content", "'input_text'"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role", "'developer'"),
    ({"input": [{"type": "function_call_output", "call_id": "", "output": "x"}]}, "input.0.call_id", "at least 1"),
    ({"tools": [{"type": "namespace", "name": "agents", "tools": [{"type": "function"}]}]}, "tools.0.tools",
     "required"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "other"}}, "tool_choice", "not among"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format", "name and schema"),
    ({"include": ["message.output_text.logprobs"]}, "include.0", "'reasoning.encrypted_content'"),
    ({"max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
    ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"input": [], "instructions": None}, "input", "nothing to answer"),
    ({"previous_response_id": "resp_nope"}, "previous_response_id", "no response 'resp_nope' is kept"),
])
async def test_refusals_are_400s_in_openais_error_shape(aiohttp_client, fields, param, words):
    client = await aiohttp_client(app_with(FakeWorker(context=4096)))
    r = await client.post("/v1/responses", json=body(**fields))
    assert r.status == 400
    error = (await r.json())["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"], error


async def test_previous_response_id_continues_and_the_oldest_are_dropped(aiohttp_client):
    worker = FakeWorker(answer=scripted("Sunny."), context=4096)
    app = app_with(worker)
    app[RESPONSES] = ResponseStore(max_responses=2)
    client = await aiohttp_client(app)
    ids = []
    for n in range(3):
        r = await client.post("/v1/responses", json=body(input=f"Question {n}?", instructions="Be brief.",
                                                         previous_response_id=ids[-1] if ids else None))
        got = await r.json()
        assert r.status == 200 and got["previous_response_id"] == (ids[-1] if ids else None), got
        ids.append(got["id"])
    prompt = prompt_of(worker)
    assert prompt.count("Be brief.") == 1 and prompt.count("Sunny.") == 2
    assert prompt.index("Question 0?") < prompt.index("Question 1?") < prompt.index("Question 2?")
    assert len(app[RESPONSES]) == 2
    r = await client.post("/v1/responses", json=body(previous_response_id=ids[0]))
    assert r.status == 400 and (await r.json())["error"]["code"] == "previous_response_not_found"
    r = await client.post("/v1/responses", json=body(previous_response_id=ids[2], store=False))
    assert r.status == 200 and len(app[RESPONSES]) == 2
    r = await client.post("/v1/responses", json=body(previous_response_id=(await r.json())["id"]))
    assert r.status == 400  # not stored


def test_the_store_keeps_to_its_byte_budget_oldest_first():
    item = MessageItem(role="user", content="x" * 100)
    size = len(item.model_dump_json(exclude_none=True))
    store = ResponseStore(max_responses=100, max_bytes=3 * size)
    for rid in "abc":
        store.put(rid, [item])
    assert len(store) == 3 and store.bytes == 3 * size
    store.put("d", [item, item])
    assert len(store) == 2 and store.bytes == 3 * size and store.get("d") == [item, item]
    with pytest.raises(Exception, match="no response 'b'"):
        store.get("b")
    store.put("huge", [item] * 4)  # larger than the whole budget: not kept, nothing dropped for it
    assert len(store) == 2 and store.get("c") == [item]


# -- the official client against a real daemon ------------------------------------------------------


def test_official_client_greedy_streams_the_same_text(tiny_daemon):
    client = tiny_daemon.client()
    ask = {"model": "tiny", "input": "Tell me about the sea.", "instructions": "Be kind.", "max_output_tokens": 24,
           "temperature": 0}
    one = client.responses.create(**ask)
    assert one.status in ("completed", "incomplete") and one.output[0].type == "message"
    assert one.usage.total_tokens == one.usage.input_tokens + one.usage.output_tokens
    assert (one.status == "incomplete") == (one.usage.output_tokens == 24)
    chat = client.chat.completions.create(model="tiny", max_tokens=24, temperature=0, messages=[
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me about the sea."}])
    assert one.output_text == chat.choices[0].message.content and one.usage.input_tokens == chat.usage.prompt_tokens
    with client.responses.stream(**ask) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response() if one.status == "completed" else None
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"] and kinds[-1] == f"response.{one.status}"
    events = list(client.responses.create(**ask, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == one.output_text
    assert events[-1].response.output_text == one.output_text
    if final is not None:
        assert final.output_text == one.output_text


def test_official_client_forced_call_json_schema_and_continuation(tiny_daemon):
    client = tiny_daemon.client()
    tool = {"type": "function", "name": "set_light", "description": "Switch a light", "strict": True,
            "parameters": {"type": "object", "properties": {"room": {"enum": ["hall", "kitchen"]},
                                                            "on": {"type": "boolean"}},
                           "required": ["room", "on"], "additionalProperties": False}}
    called = client.responses.create(model="tiny", input="Lights on in the hall.", tools=[tool], max_output_tokens=60,
                                     tool_choice={"type": "function", "name": "set_light"}, temperature=0)
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert call.name == "set_light" and called.status == "completed"
    jsonschema.validate(json.loads(call.arguments), tool["parameters"])

    schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
              "required": ["city", "days"], "additionalProperties": False}
    answer = client.responses.create(model="tiny", input="Plan a trip.", max_output_tokens=80, temperature=0,
                                     text={"format": {"type": "json_schema", "name": "trip", "schema": schema}})
    if answer.status == "completed":  # a random tiny model may run out of tokens inside a string
        jsonschema.validate(json.loads(answer.output_text), schema)
    else:
        assert answer.output_text.startswith("{")

    follow = client.responses.create(model="tiny", previous_response_id=called.id, temperature=0, max_output_tokens=4,
                                     input=[{"type": "function_call_output", "call_id": call.call_id, "output": "done"}],
                                     tools=[tool])
    spelled_out = client.responses.create(
        model="tiny", temperature=0, max_output_tokens=4, tools=[tool],
        input=[{"role": "user", "content": "Lights on in the hall."}, *called.output,
               {"type": "function_call_output", "call_id": call.call_id, "output": "done"}])
    assert follow.usage.input_tokens == spelled_out.usage.input_tokens > called.usage.input_tokens
    assert follow.output_text == spelled_out.output_text
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="tiny", input="x", previous_response_id="resp_unknown")
    assert e.value.code == "previous_response_not_found"

"""What a hostile or careless client sends gets a 4xx in the API's error shape or a well-formed
answer, never a 500: a schema the grammar engine gives up on, a grammar failing mid-answer, a forced
call cut by max_tokens, requests aiohttp cannot parse."""

import json
import socket

import anthropic
import openai
import pytest
from conftest import Daemon
from test_server_app import FakeWorker, app_with, chat_body
from test_tool_calls import GENERIC, WEATHER

from daemon.engine.grammar import GrammarError
from daemon.engine.records import Delta
from daemon.server.tool_calls import ToolCalls

ENDLESS = {"$ref": "#/$defs/a", "$defs": {"a": {"type": "object", "properties": {"n": {"$ref": "#/$defs/a"}},
                                                "required": ["n"]}}}
ENDLESS_FORMAT = {"type": "json_schema", "json_schema": {"name": "endless", "schema": ENDLESS}}
ASK = [{"role": "user", "content": "What is the weather in New York?"}]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_schema_the_grammar_engine_gives_up_on_is_a_400_before_admission(aiohttp_client, stream):
    worker = FakeWorker(context=4096)
    client = await aiohttp_client(app_with(worker))
    r = await client.post("/v1/chat/completions", json=chat_body(response_format=ENDLESS_FORMAT, stream=stream))
    error = (await r.json())["error"]
    assert r.status == 400 and error["code"] == "grammar_too_complex" and error["param"] == "response_format"
    assert "Too many items" in error["message"] and not worker.jobs
    anthropic_body = {"model": "tiny", "max_tokens": 8, "messages": ASK, "output_config": {"format": {
        "type": "json_schema", "schema": ENDLESS}}}
    r = await client.post("/v1/messages", json=anthropic_body)
    assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error" and not worker.jobs


def gives_up(job):
    yield Delta((123,), "{")
    yield GrammarError("parser error: Too many items (limit 50000)\n<state>...")


async def test_a_grammar_giving_up_mid_answer_ends_it_with_a_clear_error(aiohttp_client):
    client = await aiohttp_client(app_with(FakeWorker(answer=gives_up, context=4096)))
    schema = {"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object"}}}
    r = await client.post("/v1/chat/completions", json=chat_body(response_format=schema))
    error = (await r.json())["error"]
    assert r.status == 400 and error["code"] == "grammar_too_complex" and "<state>" not in error["message"]
    r = await client.post("/v1/chat/completions", json=chat_body(response_format=schema, stream=True))
    events = [json.loads(line[6:]) for line in (await r.text()).splitlines() if line.startswith("data: {")]
    assert r.status == 200 and events[-1]["error"]["code"] == "grammar_too_complex"


@pytest.mark.parametrize("text, arguments", [
    ('\n{"name": "get_weather", "arguments": {"city": "New', '{"city": "New'),
    ('\n{"name": "get_weather",', ""),
])
def test_a_call_cut_short_is_kept_as_far_as_it_got(text, arguments):
    calls = ToolCalls(GENERIC, [WEATHER])
    events = calls.feed(GENERIC.start + text) + calls.close(cut=True)
    assert [(kind, value["function"]) for kind, value in events] == [
        ("call", {"name": "get_weather", "arguments": arguments})]
    calls = ToolCalls(GENERIC, [WEATHER])
    assert calls.feed(GENERIC.start + '\n{"name": "get_wea') + calls.close(cut=True) == []  # no whole name: nothing
    calls = ToolCalls(GENERIC, [WEATHER])
    assert calls.feed(GENERIC.start + text) + calls.close() == [("text", GENERIC.start + text)]  # not cut: as written


def cut_answers(daemon: Daemon, limit: int) -> list[tuple[str, list, str]]:
    """(finish or stop reason, calls as (name, arguments text), text) for a forced call cut at `limit`
    tokens: OpenAI's and Anthropic's APIs, streamed and not."""
    model = daemon.client().models.list().data[0].id
    kw = dict(model=model, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=limit, temperature=0)
    chat = daemon.client().chat.completions.create(**kw)
    message = chat.choices[0].message
    out = [(chat.choices[0].finish_reason, [(c.function.name, c.function.arguments) for c in message.tool_calls or []],
            message.content or "")]
    chunks = [c.choices[0] for c in daemon.client().chat.completions.create(**kw, stream=True) if c.choices]
    out.append((chunks[-1].finish_reason, [(d.function.name, d.function.arguments) for c in chunks
                                           for d in c.delta.tool_calls or []], "".join(c.delta.content or "" for c in chunks)))
    claude = anthropic.Anthropic(base_url=daemon.url, api_key="none", max_retries=0)
    tool = {"name": WEATHER["function"]["name"], "input_schema": WEATHER["function"]["parameters"]}
    akw = dict(model=model, messages=ASK, tools=[tool], tool_choice={"type": "any"}, max_tokens=limit,
               extra_body={"temperature": 0})
    message = claude.messages.create(**akw)
    out.append((message.stop_reason, [(b.name, json.dumps(b.input)) for b in message.content if b.type == "tool_use"],
                "".join(b.text for b in message.content if b.type == "text")))
    with claude.messages.stream(**akw) as stream:
        final = stream.get_final_message()
    out.append((final.stop_reason, [(b.name, json.dumps(b.input)) for b in final.content if b.type == "tool_use"],
                "".join(b.text for b in final.content if b.type == "text")))
    return out


@pytest.mark.real_model
def test_a_forced_call_cut_by_max_tokens_is_a_length_answer_without_markup(default_daemon):
    for limit in (8, 16, 24):
        for reason, calls, text in cut_answers(default_daemon, limit):
            assert reason in ("length", "max_tokens"), (limit, reason)
            assert [name for name, _ in calls] == ["get_weather"], (limit, calls)
            assert "<tool_call>" not in text and "get_weather" not in text, (limit, text)
    with pytest.raises(openai.BadRequestError, match="too complex to follow"):
        default_daemon.client().chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK,
                                                        response_format=ENDLESS_FORMAT, max_tokens=8)
    assert "Traceback" not in default_daemon.log()


def raw(daemon: Daemon, request: bytes) -> tuple[int, str, dict]:
    """(status, content type, JSON body) of a raw request's answer."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, body = answer.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers["Content-Type"], json.loads(body)


@pytest.mark.parametrize("request_bytes, words", [
    (b"GET /" + b"a" * 8200 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "too long"),
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", "too long"),
    (b"FOO@ /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", "method"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", "malformed"),
])
def test_requests_aiohttp_cannot_parse_get_json_errors(tiny_daemon, request_bytes, words):
    status, kind, body = raw(tiny_daemon, request_bytes)
    assert status == 400 and kind.startswith("application/json")
    assert body["error"]["type"] == "invalid_request_error" and words in body["error"]["message"]
    answer = tiny_daemon.client().chat.completions.create(model="tiny", messages=ASK, max_tokens=2)
    assert answer.choices[0].finish_reason == "length"


def test_idle_connections_are_closed_and_open_files_raised(tiny_gguf):
    daemon = Daemon("--model", str(tiny_gguf), "--drafter", "none", env={"MTPD_IDLE_TIMEOUT_S": "0.5"})
    try:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as idle:
            assert idle.recv(1) == b""  # closed by the daemon, not by the 30 s timeout (that raises)
        answer = daemon.client().chat.completions.create(model="tiny", messages=ASK, max_tokens=2)
        assert answer.choices[0].finish_reason == "length"
    finally:
        assert daemon.stop() == 0, daemon.log()
    serving = next(r for r in daemon.log_records() if r["event"] == "serving")
    assert serving["open_files"] >= 1024

"""The HTTP daemon, through the official `openai` client against a real server on loopback."""

import concurrent.futures
import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from conftest import Daemon

from daemon.models.prompts import encode_chat

HELLO = [{"role": "user", "content": "Say something about the sea."}]


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def chat(daemon, **kw):
    kw.setdefault("messages", HELLO)
    kw.setdefault("model", "tiny")
    kw.setdefault("temperature", 0)
    return daemon.client().chat.completions.create(**kw)


def test_chat_greedy_usage_and_lossless_speculation(tiny_daemon, tiny_lm):
    off = chat(tiny_daemon, max_tokens=40, extra_body={"speculation": "off"})
    choice = off.choices[0]
    assert off.object == "chat.completion" and off.model == "tiny" and off.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    assert off.usage.prompt_tokens == len(encode_chat(tiny_lm.tokenizer, HELLO))
    assert off.usage.total_tokens == off.usage.prompt_tokens + off.usage.completion_tokens
    assert 1 <= off.usage.completion_tokens <= 40
    for spec in ("fixed:1", "fixed:4", "adaptive", "adaptive:mtp"):
        other = chat(tiny_daemon, max_tokens=40, extra_body={"speculation": spec})
        assert other.choices[0].message.content == choice.message.content
        assert other.model_extra["mtpd"]["speculation"] == spec
    assert chat(tiny_daemon, max_tokens=40, extra_body={"speculation": "fixed:4"}).model_extra["mtpd"]["drafted_tokens"] > 0


def test_streaming_with_usage_equals_the_whole_answer(tiny_daemon):
    whole = chat(tiny_daemon, max_tokens=30).choices[0].message.content
    chunks = list(chat(tiny_daemon, max_tokens=30, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("length", "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_completions_plain_and_streamed(tiny_daemon):
    client = tiny_daemon.client()
    done = client.completions.create(model="tiny", prompt="The sea is", max_tokens=12, temperature=0)
    assert done.object == "text_completion" and done.choices[0].text and done.usage.completion_tokens <= 12
    streamed = client.completions.create(model="tiny", prompt="The sea is", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == done.choices[0].text
    by_ids = client.completions.create(model="tiny", prompt=[5, 70, 80, 90], max_tokens=5, temperature=0)
    assert by_ids.usage.prompt_tokens == 4


def test_stop_strings_cut_the_answer(tiny_daemon):
    full = chat(tiny_daemon, max_tokens=40, extra_body={"speculation": "off"}).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = full[: full.index(stop)]
    for spec in ("off", "fixed:3"):
        for stream in (False, True):
            kw = dict(max_tokens=40, stop=[stop, "never-seen"], extra_body={"speculation": spec})
            if stream:
                text = "".join(c.choices[0].delta.content or "" for c in chat(tiny_daemon, stream=True, **kw) if c.choices)
            else:
                answer = chat(tiny_daemon, **kw)
                text = answer.choices[0].message.content
                assert answer.choices[0].finish_reason == "stop"
            assert text == cut


def test_seeds_repeat_and_differ(tiny_daemon):
    def sampled(seed, spec="fixed:2"):
        return chat(tiny_daemon, max_tokens=20, temperature=1.0, seed=seed,
                    extra_body={"speculation": spec}).choices[0].message.content

    assert sampled(7) == sampled(7)
    assert len({sampled(s) for s in range(4)}) > 1


def test_logprobs(tiny_daemon):
    answer = chat(tiny_daemon, max_tokens=8, logprobs=True, top_logprobs=2, extra_body={"speculation": "fixed:2"})
    entries = answer.choices[0].logprobs.content
    assert len(entries) == answer.usage.completion_tokens
    assert "".join(e.token for e in entries) == answer.choices[0].message.content
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 2
        assert e.top_logprobs[0].logprob >= e.logprob - 1e-6
    done = tiny_daemon.client().completions.create(model="tiny", prompt="The sea", max_tokens=5, temperature=0, logprobs=3)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset[0] == 0 and all(len(t) == 3 for t in lp.top_logprobs)


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        (b'{"messages": "hi"}', 400, "messages"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 400, "temperature"),
        (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages.0.role"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400, "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "speculation": "fixed:99"}', 400, "speculation"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}', 404, "model"),
        (b'{"messages": []}', 400, "messages"),
        (b"[1, 2]", 400, None),
    ],
)
def test_bad_requests_get_openai_errors_and_the_daemon_goes_on(tiny_daemon, body, status, param):
    code, _, answer = post(tiny_daemon.url + "/v1/chat/completions", body)
    assert code == status
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    assert answer["error"]["param"] == param
    assert "Traceback" not in json.dumps(answer)
    assert chat(tiny_daemon, max_tokens=3).usage.completion_tokens >= 1


def test_prompt_longer_than_the_context(tiny_daemon):
    with pytest.raises(openai.BadRequestError) as e:
        chat(tiny_daemon, max_tokens=5, messages=[{"role": "user", "content": "word " * 600}])
    assert e.value.code == "context_length_exceeded"
    assert chat(tiny_daemon, max_tokens=3).usage.completion_tokens >= 1


def test_body_too_large_is_413(tiny_daemon):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (5 << 20)}]}).encode()
    code, _, answer = post(tiny_daemon.url + "/v1/chat/completions", big)
    assert code == 413 and answer["error"]["code"] == "body_too_large"
    assert chat(tiny_daemon, max_tokens=3).usage.completion_tokens >= 1


def test_models_and_health(tiny_daemon):
    models = tiny_daemon.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert tiny_daemon.client().models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        tiny_daemon.client().models.retrieve("gpt-9")
    with urllib.request.urlopen(tiny_daemon.url + "/health") as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["model"] == "tiny" and health["drafter"] == "random"


def test_concurrent_mixed_clients_lose_nothing(tiny_daemon):
    def one(i):
        kw = dict(max_tokens=10 + i % 7, temperature=0, messages=[{"role": "user", "content": f"Tell me {i}."}])
        if i % 2:
            chunks = list(chat(tiny_daemon, stream=True, stream_options={"include_usage": True}, **kw))
            return i, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage
        answer = chat(tiny_daemon, **kw)
        return i, answer.choices[0].message.content, answer.usage

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(40)))
    assert len(results) == 40 and all(usage.completion_tokens >= 1 for _, _, usage in results)
    expected = {i: text for i, text, _ in results}
    again = dict(one(i)[:2] for i in (1, 2, 3))  # the same requests alone give the same answers
    assert all(again[i] == expected[i] for i in again)


def test_client_disconnect_frees_the_engine(tiny_daemon):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", tiny_daemon.port, timeout=30)
    body = {"messages": HELLO, "max_tokens": 450, "temperature": 0, "stream": True, "speculation": "off"}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.fp.readline()  # the first event
    conn.sock.close()
    conn.close()
    assert chat(tiny_daemon, max_tokens=3).usage.completion_tokens >= 1
    time.sleep(0.5)
    gone = [r for r in tiny_daemon.log_records() if r.get("status") == "client_gone"]
    assert gone and gone[-1]["stream"] is True


def test_api_key_and_queue_limit(tiny_gguf):
    daemon = Daemon("--model", str(tiny_gguf), "--drafter", "none",
                    env={"MTPD_API_KEY": "s3cret", "MTPD_MAX_QUEUE": "1"})
    try:
        with pytest.raises(openai.AuthenticationError):
            chat(daemon, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            daemon.client(api_key="wrong").models.list()
        client = daemon.client(api_key="s3cret")
        assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).usage.completion_tokens >= 1
        with urllib.request.urlopen(daemon.url + "/health") as r:
            assert r.status == 200  # health needs no key

        body = json.dumps({"messages": HELLO, "max_tokens": 400, "temperature": 0}).encode()
        auth = {"Authorization": "Bearer s3cret"}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: post(daemon.url + "/v1/chat/completions", body, auth), range(6)))
        codes = sorted(code for code, _, _ in answers)
        assert codes.count(200) >= 2 and 503 in codes and set(codes) <= {200, 503}, codes
        for code, headers, answer in answers:
            if code == 503:
                assert headers["Retry-After"] == "1" and answer["error"]["code"] == "queue_full"
        assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).usage.completion_tokens >= 1
    finally:
        assert daemon.stop() == 0


def test_sigterm_lets_the_request_in_flight_finish(tiny_gguf):
    daemon = Daemon("--model", str(tiny_gguf), "--drafter", "none")
    result = {}

    def slow():
        result["answer"] = chat(daemon, max_tokens=450, stream=False, extra_body={"speculation": "off"})

    worker = threading.Thread(target=slow)
    worker.start()
    time.sleep(0.3)
    assert daemon.stop(15) == 0
    worker.join(30)
    assert result["answer"].usage.completion_tokens >= 1
    with pytest.raises(openai.APIConnectionError):
        chat(daemon, max_tokens=2)

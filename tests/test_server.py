"""The HTTP daemon, through the official `openai` client against a real server on loopback (the
error cases run in-process: test_server_app.py)."""

import concurrent.futures
import json
import threading
import urllib.error
import urllib.request

import openai
import pytest
from conftest import Daemon, until

from daemon.models.prompts import encode_chat

HELLO = [{"role": "user", "content": "Say something about the sea."}]


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())



def health(daemon) -> dict:
    with urllib.request.urlopen(daemon.url + "/health") as r:
        return json.loads(r.read())


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
    gone = until(lambda: [r for r in tiny_daemon.log_records() if r.get("status") == "client_gone"])
    assert gone[-1]["stream"] is True


def test_sigterm_lets_the_request_in_flight_finish(tiny_gguf):
    daemon = Daemon("--model", str(tiny_gguf), "--drafter", "none")
    result = {}

    def slow():
        result["answer"] = chat(daemon, max_tokens=450, stream=False, extra_body={"speculation": "off"})

    worker = threading.Thread(target=slow)
    worker.start()
    until(lambda: health(daemon)["busy"])  # the request is being answered
    assert daemon.stop(15) == 0
    worker.join(30)
    assert result["answer"].usage.completion_tokens >= 1
    with pytest.raises(openai.APIConnectionError):
        chat(daemon, max_tokens=2)

"""The HTTP app in-process (aiohttp's `aiohttp_client`) with a fake engine worker: how every
failure maps to a status code and OpenAI's error JSON, and that the app goes on serving."""

import functools
import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from daemon.cluster.faults import RankLost
from daemon.engine.memory import Memory
from daemon.engine.records import Delta, Finished, SpecStats
from daemon.models.registry import Entry
from daemon.server.app import init_app
from daemon.server.metrics import Metrics
from daemon.server.worker import DeadlineExceeded, QueueFull, ServedModel
from daemon.settings import Settings

HI = [{"role": "user", "content": "hi"}]


@functools.cache
def _byte_tokenizer():
    """A Hugging Face tokenizer with one token per byte (id = the byte), so grammars compile over it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    shown = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}  # GPT-2's byte alphabet
    model = Tokenizer(models.BPE({shown[b]: b for b in range(256)}, []))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    model.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token=shown[0])


class CharTokenizer:
    """One token per character (ids 0..255), no chat template."""

    has_chat_template = False
    eos_token_ids = ()

    @property
    def _tokenizer(self):  # what grammars are compiled over (daemon.engine.grammar)
        return _byte_tokenizer()

    def encode(self, text):
        return [ord(c) % 256 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class FakeWorker:
    """Answers each job at once on the calling thread with `answer(job)`: a list of records."""

    def __init__(self, answer=None, drafter: str | None = "fake-drafter", context: int = 64):
        self.served = ServedModel("tiny", CharTokenizer(), 256, context, drafter)
        self.models, self.known = {"tiny": Entry("tiny", None, "model")}, {"tiny": self.served}
        self.loaded, self.loading = {"tiny": 1000}, 0
        self.answer = answer or echo
        self.jobs = []
        self.waiting, self.running, self.busy, self.started, self.stopped = 0, 0, False, False, False
        self.lost = None
        self.memory = Memory(mlx_active_bytes=1000)

    def start(self):
        self.started = True

    def stop(self, timeout=None):
        self.stopped = True

    def costs(self):
        return {"draft_ms": 2.0, "round_ms": [50.0, 60.0, 70.0], "lookup_round_ms": [50.0, 55.0, 62.0], "block": False}

    def submit(self, job):
        self.jobs.append(job)
        for record in self.answer(job):
            job.deliver(record)


def echo(job):
    """The prompt's last three characters, one per step, then Finished."""
    ids = job.request.prompt_ids[-3:][: job.request.max_tokens]
    stats = SpecStats()
    yield from (Delta((t,), chr(t)) for t in ids)
    yield Finished("length", len(job.request.prompt_ids), len(ids), 0, 0.01, 0.02, stats, tuple(ids))


def app_with(worker=None, **settings):
    return init_app(Settings(**settings), worker or FakeWorker(), Metrics())


def chat_body(**kw) -> dict:
    return {"messages": HI, **kw}


async def test_a_chat_answer_and_the_worker_opened_and_closed(aiohttp_client):
    worker = FakeWorker()
    client = await aiohttp_client(app_with(worker))
    assert worker.started
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=5))
    assert r.status == 200
    body = await r.json()
    assert body["choices"][0]["message"]["content"] == "hi"  # the fake echoes the prompt's end
    assert body["usage"]["completion_tokens"] == 2 and body["mtpd"]["speculation"] == "adaptive"
    assert worker.jobs[0].request.max_tokens == 5
    await client.close()
    assert worker.stopped


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
        (b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}', 400, "top_logprobs"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "model": "llama-9b"}', 404, "model"),
        (b'{"messages": []}', 400, "messages"),
        (b"[1, 2]", 400, None),
    ],
)
async def test_bad_bodies_get_openai_errors(aiohttp_client, body, status, param):
    worker = FakeWorker()
    client = await aiohttp_client(app_with(worker))
    r = await client.post("/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    assert r.status == status
    error = (await r.json())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert not worker.jobs  # refused before the engine


async def test_limits_of_the_model(aiohttp_client):
    client = await aiohttp_client(app_with(FakeWorker(drafter=None, context=64)))
    r = await client.post("/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": "x" * 80}]))
    assert r.status == 400 and (await r.json())["error"]["code"] == "context_length_exceeded"
    r = await client.post("/v1/completions", json={"prompt": [1, 999]})
    assert r.status == 400 and (await r.json())["error"]["param"] == "prompt"
    r = await client.post("/v1/chat/completions", json=chat_body(speculation="fixed:2"))
    assert r.status == 400 and "no drafter" in (await r.json())["error"]["message"]
    r = await client.post("/v1/chat/completions", json=chat_body())
    assert r.status == 200 and (await r.json())["mtpd"]["speculation"] == "off"


async def test_max_tokens_is_clamped_to_the_room_left(aiohttp_client):
    worker = FakeWorker(context=64)
    client = await aiohttp_client(app_with(worker))
    r = await client.post("/v1/completions", json={"prompt": "x" * 60, "max_tokens": 1000})
    assert r.status == 200 and worker.jobs[0].request.max_tokens == 4
    await client.post("/v1/completions", json={"prompt": "x"})
    assert worker.jobs[1].request.max_tokens == 63  # the default (512) clamped too


async def test_max_tokens_limit_lowers_what_a_request_asks(aiohttp_client):
    worker = FakeWorker(context=64)
    client = await aiohttp_client(app_with(worker, max_tokens_limit=8, context_overflow="reject"))
    for body in ({"prompt": "x", "max_tokens": 32000 - 63}, {"prompt": "x"}, {"prompt": "x", "max_tokens": 5}):
        assert (await client.post("/v1/completions", json=body)).status == 200
    assert [j.request.max_tokens for j in worker.jobs] == [8, 8, 5]  # a cap, not the context: never refused


async def test_default_temperature_is_for_requests_that_give_none(aiohttp_client):
    worker = FakeWorker()
    client = await aiohttp_client(app_with(worker, default_temperature=0.0))
    await client.post("/v1/chat/completions", json=chat_body())
    await client.post("/v1/chat/completions", json=chat_body(temperature=0.7))
    assert (await client.post("/v1/messages", json={"model": "tiny", "max_tokens": 4, "messages": HI})).status == 200
    response = await (await client.post("/v1/responses", json={"input": "hi"})).json()
    assert [j.request.sampling.temperature for j in worker.jobs] == [0.0, 0.7, 0.0, 0.0]
    assert response["temperature"] == 0.0  # echoed as applied


async def test_max_tokens_past_the_context_rejected_when_set_so(aiohttp_client):
    worker = FakeWorker(context=64)
    client = await aiohttp_client(app_with(worker, context_overflow="reject"))
    r = await client.post("/v1/completions", json={"prompt": "x" * 60, "max_tokens": 1000})
    assert r.status == 400
    assert (await r.json())["error"]["code"] == "context_length_exceeded" and not worker.jobs
    assert (await client.post("/v1/completions", json={"prompt": "x" * 60, "max_tokens": 4})).status == 200


async def test_body_too_large_and_unknown_routes(aiohttp_client):
    client = await aiohttp_client(app_with(max_body_bytes=2048))
    r = await client.post("/v1/chat/completions", data=json.dumps(chat_body(stop="x" * 4096)))
    assert r.status == 413 and (await r.json())["error"]["code"] == "body_too_large"
    r = await client.get("/v1/nothing")
    assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    r = await client.get("/v1/chat/completions")
    assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"
    r = await client.get("/v1/models/gpt-9")
    assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"


async def test_api_key(aiohttp_client):
    client = await aiohttp_client(app_with(api_key="s3cret"))
    r = await client.post("/v1/chat/completions", json=chat_body())
    assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"
    r = await client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status == 401
    r = await client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
    assert r.status == 200 and [m["id"] for m in (await r.json())["data"]][0] == "tiny"
    assert (await client.get("/health")).status == 200  # health needs no key


async def test_models_in_anthropics_shape_for_anthropics_clients(aiohttp_client):
    client = await aiohttp_client(app_with(FakeWorker()))
    listed = await (await client.get("/v1/models", headers={"anthropic-version": "2023-06-01"})).json()
    assert listed["data"][0] == {"type": "model", "id": "tiny", "display_name": "tiny",
                                 "created_at": listed["data"][0]["created_at"]}
    assert listed["has_more"] is False and listed["first_id"] == "tiny" and listed["last_id"] == listed["data"][-1]["id"]
    assert listed["data"][0]["created_at"].endswith("Z")
    one = await (await client.get("/v1/models/tiny:off", headers={"anthropic-version": "2023-06-01"})).json()
    assert one["type"] == "model" and one["id"] == "tiny:off" and "object" not in one


async def test_model_names_with_a_policy_suffix(aiohttp_client):
    """For clients that cannot send `speculation`: `<model>:<policy>` is listed and chooses it."""
    worker = FakeWorker()
    client = await aiohttp_client(app_with(worker))
    ids = [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]
    assert ids[0] == "tiny" and {"tiny:off", "tiny:adaptive", "tiny:fixed:2"} <= set(ids)
    assert (await client.get("/v1/models/tiny:fixed:2")).status == 200
    assert (await client.get("/v1/models/tiny:fixed:99")).status == 404
    r = await client.post("/v1/chat/completions", json=chat_body(model="tiny:fixed:2"))
    assert r.status == 200 and (await r.json())["mtpd"]["speculation"] == "fixed:2" and worker.jobs[-1].speculation == "fixed:2"
    r = await client.post("/v1/chat/completions", json=chat_body(model="tiny:off", speculation="fixed:2"))
    assert r.status == 400 and (await r.json())["error"]["param"] == "speculation"
    no_drafter = await aiohttp_client(app_with(FakeWorker(drafter=None)))
    ids = [m["id"] for m in (await (await no_drafter.get("/v1/models")).json())["data"]]
    assert ids == ["tiny", "tiny:off"]


def failing(record):
    def answer(job):
        yield record

    return answer


async def error_of(r, stream: bool) -> tuple[int, dict]:
    """(status, error object): a streamed answer has sent its headers (200), the error is an event."""
    if not stream:
        return r.status, (await r.json())["error"]
    events = [line.removeprefix("data: ") for line in (await r.text()).splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return r.status, json.loads(events[-2])["error"]


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_failures(aiohttp_client, stream):
    worker = FakeWorker()
    client = await aiohttp_client(app_with(worker))
    worker.answer = failing(RuntimeError("secret internals"))
    r = await client.post("/v1/chat/completions", json=chat_body(stream=stream))
    assert "secret" not in await r.text()
    status, error = await error_of(r, stream)
    assert status == (200 if stream else 500) and error["type"] == "server_error"
    worker.answer = failing(DeadlineExceeded("the request waited in the queue past its timeout"))
    r = await client.post("/v1/chat/completions", json=chat_body(stream=stream))
    status, error = await error_of(r, stream)
    assert status == (200 if stream else 504) and error["code"] == "timeout"
    worker.answer = echo
    assert (await client.post("/v1/chat/completions", json=chat_body(stream=stream))).status == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_a_lost_rank_is_503_and_so_is_health_after(aiohttp_client, stream):
    worker = FakeWorker()
    client = await aiohttp_client(app_with(worker))
    lost = RankLost("rank 1 on mac2 exited (code -9); mtpd stops so that its service manager restarts the group")
    worker.answer = failing(lost)
    r = await client.post("/v1/chat/completions", json=chat_body(stream=stream))
    status, error = await error_of(r, stream)
    assert status == (200 if stream else 503) and error["code"] == "rank_lost" and "rank 1 on mac2" in error["message"]
    r = await client.post("/v1/messages", json={"model": "tiny", "max_tokens": 4, "messages": HI})
    assert r.status == 503 and (await r.json())["error"]["type"] == "overloaded_error"
    worker.lost = lost
    r = await client.get("/health")
    assert r.status == 503 and (await r.json())["error"] == str(lost)


async def test_queue_full_is_503_with_retry_after(aiohttp_client):
    worker = FakeWorker()
    client = await aiohttp_client(app_with(worker))

    def full(job):
        raise QueueFull

    worker.answer = full
    r = await client.post("/v1/chat/completions", json=chat_body())
    assert r.status == 503 and r.headers["Retry-After"] == "1"
    assert (await r.json())["error"]["code"] == "queue_full"


async def test_an_engine_that_never_answers_times_out(aiohttp_client, monkeypatch):
    monkeypatch.setattr("daemon.server.streaming.GRACE_SECONDS", 0.0)
    worker = FakeWorker(answer=lambda job: iter(()))
    client = await aiohttp_client(app_with(worker, request_timeout_s=0.2))
    r = await client.post("/v1/chat/completions", json=chat_body())
    assert r.status == 504 and (await r.json())["error"]["code"] == "timeout"


async def test_an_error_after_the_first_token_goes_in_the_stream(aiohttp_client):
    def half(job):
        yield Delta((104,), "h")
        yield DeadlineExceeded("the request ran past its timeout")

    client = await aiohttp_client(app_with(FakeWorker(answer=half)))
    r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.status == 200
    events = [line.removeprefix("data: ") for line in (await r.text()).splitlines() if line]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout"
    assert json.loads(events[1])["choices"][0]["delta"]["content"] == "h"


async def test_health_counts_what_was_served(aiohttp_client):
    def drafted(job):
        stats = SpecStats()
        stats.observe_draft(4, 3, "code", "mtp")
        stats.draft_lengths += [4, 0]
        yield Finished("stop", 3, 5, 0, 0.01, 0.02, stats, (1, 2, 3, 4, 5))

    client = await aiohttp_client(app_with(FakeWorker(answer=drafted)))
    for _ in range(2):
        assert (await client.post("/v1/chat/completions", json=chat_body())).status == 200
    health = await (await client.get("/health")).json()
    assert health["requests_served"] == 2 and health["completion_tokens"] == 10
    assert health["acceptance_rate"] == 0.75
    assert health["last_request_speculation"] == {"policy": "adaptive", "drafted_steps": 1, "completion_tokens": 5,
                                                  "drafted": 4, "accepted": 3}
    assert health["model"] == "tiny" and health["drafter"] == "fake-drafter"
    assert health["running"] == 0 and health["waiting"] == 0
    metrics = await (await client.get("/metrics")).text()
    assert 'mtpd_requests_total{endpoint="chat",model="tiny",status="200"} 2.0' in metrics



async def test_a_queued_stream_gets_its_headers_at_once_and_keep_alives(aiohttp_client, monkeypatch):
    """A streaming request waiting for the engine (here: a worker that has not started it) has its
    headers and SSE comments before its first token, so clients' header timeouts do not fire."""
    import asyncio

    from daemon.server import handlers

    monkeypatch.setattr(handlers, "KEEPALIVE_SECONDS", 0.1)
    held = []
    worker = FakeWorker()
    worker.submit = held.append
    client = await aiohttp_client(app_with(worker))
    r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream" and held  # no token yet
    first = await r.content.readuntil(b"\n\n")
    assert b'"role":"assistant"' in first
    assert await r.content.readuntil(b"\n\n") == b": keep-alive\n\n"
    for record in echo(held[0]):
        held[0].deliver(record)
    await asyncio.sleep(0)
    events = [json.loads(line[6:]) for line in (await r.text()).splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "hi"

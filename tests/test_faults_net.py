"""Clients that misbehave, survived: one sending its headers a byte at a time, 200 idle sockets,
clients that vanish mid-prefill, mid-answer and mid-stream. Each case ends with the daemon serving and its next
greedy answer token-identical to the one it gave before (docs/serving.md, Faults)."""

import http.client
import json
import resource
import socket
import time
import urllib.request

import pytest
from conftest import until

QUESTION = [{"role": "user", "content": "Say something about the sea."}]
LONG = [{"role": "user", "content": "The sea is wide and the waves are long. " * 45}]  # prefills in several chunks


def answer(daemon) -> tuple[str, int]:
    """The greedy answer to QUESTION, and its prompt tokens."""
    r = daemon.client().chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=16)
    return r.choices[0].message.content, r.usage.prompt_tokens


def request_bytes(body: dict) -> tuple[bytes, bytes]:
    """A chat request as a client writes it: the head (request line and headers) and the body."""
    data = json.dumps({"model": "tiny", "temperature": 0, **body}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    return head.encode(), data


def health(daemon) -> dict:
    with urllib.request.urlopen(daemon.url + "/health") as r:
        return json.loads(r.read())


def finished_prompt_tokens(daemon) -> float:
    """Prompt tokens of the requests the engine finished (mtpd_prompt_tokens_total)."""
    with urllib.request.urlopen(daemon.url + "/metrics") as r:
        lines = [x for x in r.read().decode().splitlines() if x.startswith("mtpd_prompt_tokens_total{")]
    return sum(float(line.split()[-1]) for line in lines)



def gone(daemon, stream: bool, prompt_tokens=lambda n: True) -> list[dict]:
    """The request log's lines of requests whose client left."""
    return [r for r in daemon.log_records() if r.get("event") == "request" and r["status"] == "client_gone"
            and r["stream"] is stream and prompt_tokens(r["prompt_tokens"])]


def assert_dropped(daemon, finished: float, reference: tuple[str, int]) -> None:
    """The next answer is right, and once the engine is idle it has finished that one alone: the
    vanished request left it unfinished (were it still running, it would have finished by then)."""
    assert answer(daemon) == reference
    until(lambda: (h := health(daemon))["running"] == h["waiting"] == 0)
    assert finished_prompt_tokens(daemon) == finished + reference[1]


@pytest.fixture(scope="module")
def reference(tiny_daemon) -> tuple[str, int]:
    return answer(tiny_daemon)


def test_a_client_sending_its_headers_a_byte_at_a_time(tiny_daemon, reference):
    head, body = request_bytes({"messages": QUESTION, "max_tokens": 16})
    with socket.create_connection(("127.0.0.1", tiny_daemon.port), timeout=60) as slow:
        slow.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one byte a segment

        def trickle(part: bytes) -> None:
            for byte in part:
                slow.send(bytes([byte]))
                time.sleep(0.002)

        trickle(head[: len(head) // 2])
        assert [answer(tiny_daemon) for _ in range(3)] == [reference] * 3  # served while it dawdles
        trickle(head[len(head) // 2 :])
        slow.sendall(body)
        reply = b"".join(iter(lambda: slow.recv(65536), b""))
    status, _, payload = reply.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200")
    assert json.loads(payload)["choices"][0]["message"]["content"] == reference[0]


def test_200_idle_sockets_leave_the_daemon_serving(tiny_daemon, reference):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    head, _ = request_bytes({"messages": QUESTION})
    idle = [socket.create_connection(("127.0.0.1", tiny_daemon.port), timeout=60) for _ in range(200)]
    try:
        for s in idle[::2]:  # half of them never finish their headers
            s.sendall(head[:40])
        assert answer(tiny_daemon) == reference
        assert health(tiny_daemon)["status"] == "ok"
    finally:
        for s in idle:
            s.close()
    assert answer(tiny_daemon) == reference


def test_a_client_gone_mid_prefill_frees_the_engine(tiny_daemon, reference):
    finished = finished_prompt_tokens(tiny_daemon)
    head, body = request_bytes({"messages": LONG, "max_tokens": 400})
    with socket.create_connection(("127.0.0.1", tiny_daemon.port), timeout=60) as s:
        s.sendall(head + body)  # and closes at once
    (record,) = until(lambda: gone(tiny_daemon, stream=False, prompt_tokens=lambda n: n > 1000))
    assert "completion_tokens" not in record  # it never finished
    assert_dropped(tiny_daemon, finished, reference)


def test_a_client_gone_mid_answer_frees_the_engine(tiny_daemon, reference):
    finished = finished_prompt_tokens(tiny_daemon)
    head, body = request_bytes({"messages": QUESTION, "max_tokens": 1500})  # not streamed: nothing to read
    with socket.create_connection(("127.0.0.1", tiny_daemon.port), timeout=60) as s:
        s.sendall(head + body)
        until(lambda: health(tiny_daemon)["running"] == 1)  # being answered
    until(lambda: gone(tiny_daemon, stream=False, prompt_tokens=lambda n: n == reference[1]))
    assert_dropped(tiny_daemon, finished, reference)


def test_a_client_gone_mid_stream_frees_the_engine(tiny_daemon, reference):
    finished = finished_prompt_tokens(tiny_daemon)
    conn = http.client.HTTPConnection("127.0.0.1", tiny_daemon.port, timeout=60)
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 1500, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    events = 0
    while events < 2:  # the role chunk and the first tokens'
        events += response.fp.readline().startswith(b"data: ")
    conn.sock.close()
    conn.close()
    until(lambda: gone(tiny_daemon, stream=True))
    assert_dropped(tiny_daemon, finished, reference)

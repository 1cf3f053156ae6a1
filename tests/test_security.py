"""Security basics (docs/serving.md#security): the API key on every /v1 route, compared in constant
time; /health and /metrics open (loopback, Prometheus scrapes without a key); no prompt or answer
text in the log unless `log_prompts`; loopback by default; no file reachable through a URL; the
cross-origin policy (daemon/server/security.py)."""

import asyncio
import json

import pytest
from conftest import Daemon
from test_server_app import FakeWorker, app_with, chat_body

from daemon.server.security import origin_allowed
from daemon.settings import Settings, load_settings

KEY = "s3cret"
MARKER = "zq-marker-7f3c"


def route_paths(app) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, a path parameter filled with the model's name."""
    return [(r.method, r.resource.canonical.replace("{model}", "tiny").replace("{name}", "page.js"))
            for r in app.router.routes() if r.method != "HEAD"]


async def test_every_v1_and_mtpd_route_needs_the_key_and_the_rest_do_not(aiohttp_client):
    app = app_with(api_key=KEY)
    client = await aiohttp_client(app)
    routes = route_paths(app)
    assert ("POST", "/v1/messages/count_tokens") in routes and ("GET", "/v1/models") in routes
    for method, path in routes:
        r = await client.request(method, path, json=chat_body())
        if path.startswith(("/v1/", "/mtpd/")):
            assert r.status == 401, (method, path)
            assert (await r.json())["error"]["type"] == "authentication_error"
            for header in ({"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
                r = await client.request(method, path, json={"messages": chat_body()["messages"]}, headers=header)
                assert r.status != 401, (method, path, header)
        else:
            assert r.status == 200, (method, path)  # /health, /metrics, the page's files


async def test_the_key_is_compared_in_constant_time(aiohttp_client, monkeypatch):
    import hmac

    compared, compare = [], hmac.compare_digest

    def recorded(a, b):
        compared.append((a, b))
        return compare(a, b)

    monkeypatch.setattr("daemon.server.app.hmac.compare_digest", recorded)
    client = await aiohttp_client(app_with(api_key=KEY))
    r = await client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status == 401
    assert (b"Bearer wrong", f"Bearer {KEY}".encode()) in compared


async def raw_get(host: str, port: int, target: str, key: str | None = None) -> tuple[int, str]:
    """A request line sent as written: no client normalizes the path first."""
    reader, writer = await asyncio.open_connection(host, port)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}Connection: close\r\n\r\n".encode())
    await writer.drain()
    response = (await reader.read()).decode(errors="replace")
    writer.close()
    head, _, body = response.partition("\r\n\r\n")
    return int(head.split()[1]), body


@pytest.fixture(scope="module")
def keyed_daemon(tiny_gguf):
    daemon = Daemon("--model", str(tiny_gguf), "--drafter", "none", env={"MTPD_API_KEY": KEY})
    yield daemon
    assert daemon.stop() == 0, daemon.log()


TRAVERSALS = ["/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/static/..%2f..%2fetc%2fpasswd",
              "/v1/models/..%2F..%2Fetc%2Fpasswd", "/v1/models/../../../etc/passwd", "/..%5c..%5cetc%5cpasswd",
              "//etc/passwd", "/health/../../etc/passwd", "/page/../app.py", "/page/..%2fapp.py",
              "/page/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/page/..%2f..%2f..%2f..%2fetc%2fpasswd", "/page//etc/passwd",
              "/page/..%5capp.py"]
BYPASSES = ["/v1/../v1/models", "//v1/models", "/v1//models", "/%76%31/models", "/V1/models", "/v1/models/",
            "/health/../v1/models", "/mtpd/../mtpd/status", "//mtpd/status", "/MTPD/status", "/%6dtpd/status",
            "/page/../mtpd/status"]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_no_file_is_reachable_through_a_url(keyed_daemon, target):
    status, body = asyncio.run(raw_get("127.0.0.1", keyed_daemon.port, target, key=KEY))
    assert status in (400, 404), (target, status, body)
    assert "error" in json.loads(body) and "root:" not in body


@pytest.mark.parametrize("target", BYPASSES)
def test_no_spelling_of_a_path_skips_the_key(keyed_daemon, target):
    status, body = asyncio.run(raw_get("127.0.0.1", keyed_daemon.port, target))
    assert status in (400, 401, 404), (target, status, body)
    assert "tiny" not in body  # the model list never leaks


def test_logs_hold_no_prompt_or_answer_and_the_daemon_is_on_loopback(keyed_daemon):
    assert Settings.model_fields["host"].default == "127.0.0.1"
    serving = next(r for r in keyed_daemon.log_records() if r["event"] == "serving")
    assert serving["url"].startswith("http://127.0.0.1:")
    answer = keyed_daemon.client(api_key=KEY).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": f"say {MARKER}"}], max_tokens=4)
    assert answer.choices[0].finish_reason
    request = next(r for r in keyed_daemon.log_records() if r["event"] == "request")
    assert request["status"] == "ok" and "prompt" not in request and "answer" not in request
    assert MARKER not in keyed_daemon.log()


def test_log_prompts_logs_them(tiny_gguf):
    daemon = Daemon("--model", str(tiny_gguf), "--drafter", "none", env={"MTPD_LOG_PROMPTS": "1"})
    try:
        answer = daemon.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"say {MARKER}"}], max_tokens=4)
    finally:
        assert daemon.stop() == 0
    request = next(r for r in daemon.log_records() if r["event"] == "request")
    assert MARKER in request["prompt"] and request["answer"] == answer.choices[0].message.content


@pytest.mark.parametrize("origin, allowed", [
    ("http://localhost", True), ("http://localhost:3000", True), ("http://127.0.0.1:8080", True),
    ("http://[::1]:5173", True), ("HTTP://LOCALHOST:3000", True),
    ("https://localhost:3000", False), ("http://localhost.evil.example", False), ("http://127.0.0.1.nip.io", False),
    ("http://localhost:3000@evil.example", False), ("http://evil.example", False), ("null", False),
    ("file://", False),
])
def test_default_allowed_origins_are_loopback_pages_only(origin, allowed):
    assert origin_allowed(origin, Settings.model_fields["allowed_origins"].default) is allowed


def test_allowed_origins_entries():
    assert origin_allowed("https://app.example", ["https://app.example/"])
    assert not origin_allowed("https://app.example:8443", ["https://app.example"])
    assert origin_allowed("https://app.example:8443", ["https://app.example:*"])
    assert origin_allowed("https://anything.example", ["*"])


@pytest.mark.parametrize("path, shape", [("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic")])
async def test_a_foreign_page_cannot_make_it_generate(aiohttp_client, path, shape):
    """A "simple" cross-origin POST (text/plain, no preflight), or a DNS-rebinding page's: refused
    before the engine sees it, in the API's error shape."""
    worker = FakeWorker()
    client = await aiohttp_client(app_with(worker))
    body = json.dumps({"model": "tiny", "max_tokens": 4, **chat_body()})
    for origin in ("http://evil.example", f"http://rebound.example:{client.port}"):
        r = await client.post(path, data=body, headers={"Content-Type": "text/plain", "Origin": origin})
        assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        error = await r.json()
        if shape == "anthropic":
            assert error["type"] == "error" and error["error"]["type"] == "permission_error"
        else:
            assert error["error"]["code"] == "origin_not_allowed"
    assert worker.jobs == []


async def test_an_allowed_page_gets_cors_headers_and_its_preflight_answered(aiohttp_client):
    client = await aiohttp_client(app_with(api_key=KEY))
    page = "http://localhost:3000"
    r = await client.options("/v1/chat/completions", headers={
        "Origin": page, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status == 204  # a preflight carries no key
    assert r.headers["Access-Control-Allow-Origin"] == page and "POST" in r.headers["Access-Control-Allow-Methods"]
    assert r.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    r = await client.options("/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                              "Access-Control-Request-Method": "POST"})
    assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
    auth = {"Authorization": f"Bearer {KEY}", "Origin": page}
    for stream in (False, True):
        r = await client.post("/v1/chat/completions", json=chat_body(stream=stream), headers=auth)
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == page and r.headers["Vary"] == "Origin"
        assert "x-mtpd-unused-hints" in r.headers["Access-Control-Expose-Headers"].split(", ")  # a page may read it
        await r.read()
    r = await client.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": f"Bearer {KEY}"})
    assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers  # no Origin: as before


async def test_the_allow_list_is_a_setting(aiohttp_client, monkeypatch):
    client = await aiohttp_client(app_with(allowed_origins=["https://chat.example"]))
    assert (await client.post("/v1/chat/completions", json=chat_body(), headers={"Origin": "https://chat.example"})).status == 200
    assert (await client.post("/v1/chat/completions", json=chat_body(), headers={"Origin": "http://localhost"})).status == 403
    monkeypatch.setenv("MTPD_ALLOWED_ORIGINS", '["*"]')
    settings, origin = load_settings()
    assert settings.allowed_origins == ["*"] and origin["allowed_origins"] == "env MTPD_ALLOWED_ORIGINS"
    monkeypatch.setenv("MTPD_ALLOWED_ORIGINS", "*")
    with pytest.raises(ValueError, match='invalid setting: .*"allowed_origins"'):
        load_settings()

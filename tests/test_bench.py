import json

import pytest
from conftest import run_mtpd

from daemon.bench.run import read_prompts, run_bench, summarize
from daemon.models.loading import load

PROMPTS = [
    {"id": "a", "category": "code", "messages": [{"role": "user", "content": "def f"}]},
    {"id": "b", "category": "prose", "prompt": "the tea"},
    {"id": "c", "category": "code", "prompt": "in a"},
]


def test_report_contract_and_parity_with_mlx_lm(tiny_lm, tiny_gguf):
    stock = load(str(tiny_gguf), drafter="none", stock=True)
    report = run_bench(tiny_lm, PROMPTS, ["off", "mlx-lm"], max_tokens=10, baseline=stock)
    assert set(report) == {"model", "drafter", "machine", "results", "summary"}
    assert report["drafter"] is None and "cores" in report["machine"]
    assert [(r["id"], r["spec"]) for r in report["results"]] == [
        ("a", "off"), ("a", "mlx-lm"), ("b", "off"), ("b", "mlx-lm"), ("c", "off"), ("c", "mlx-lm"),
    ]  # interleaved per prompt
    keys = {"id", "category", "spec", "prompt_tokens", "completion_tokens", "seconds", "tokens_per_second",
            "drafted", "accepted", "token_ids"}
    for row in report["results"]:
        assert keys <= set(row)
        assert row["completion_tokens"] == len(row["token_ids"]) > 0
    by_prompt = {}
    for row in report["results"]:
        by_prompt.setdefault(row["id"], []).append(row["token_ids"])
    for ids in by_prompt.values():
        assert ids[0] == ids[1]  # our greedy loop and mlx-lm's give the same tokens
    cells = {(s["spec"], s["category"]) for s in report["summary"]}
    assert cells == {(s, c) for s in ("off", "mlx-lm") for c in ("code", "prose", "all")}
    for s in report["summary"]:
        assert s["acceptance"] is None
        if s["spec"] == "off":
            assert s["speedup_vs_off"] == pytest.approx(1.0)


def test_summary_arithmetic():
    rows = [
        dict(category="x", spec="off", seconds=2.0, completion_tokens=11, drafted=0, accepted=0),
        dict(category="x", spec="fixed:2", seconds=1.0, completion_tokens=11, drafted=8, accepted=6),
        dict(category="y", spec="off", seconds=1.0, completion_tokens=6, drafted=0, accepted=0),
        dict(category="y", spec="fixed:2", seconds=1.0, completion_tokens=6, drafted=4, accepted=1),
    ]
    summary = {(s["spec"], s["category"]): s for s in summarize(rows, ["off", "fixed:2"])}
    assert summary["off", "x"]["tokens_per_second"] == 5.0
    assert summary["fixed:2", "x"]["speedup_vs_off"] == 2.0
    assert summary["fixed:2", "all"]["acceptance"] == pytest.approx(7 / 12)
    assert summary["fixed:2", "all"]["tokens_per_second"] == pytest.approx(15 / 2)
    assert summary["off", "all"]["acceptance"] is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not JSON"),
        ('{"prompt": "x"}', "needs an object with an `id`"),
        ('{"id": 1}', "needs `messages`"),
        ("", "no prompts"),
    ],
)
def test_bad_prompt_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_prompts(path)


def test_cli_writes_the_report(tmp_path, tiny_gguf):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in PROMPTS[:2]))
    out = tmp_path / "r.json"
    done = run_mtpd("bench", "--prompts", str(prompts), "--model", str(tiny_gguf), "--spec", "off",
                    "--max-tokens", "6", "--repeat", "2", "--json", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert len(report["results"]) == 4
    assert "[2/2] b off" in done.stderr


def test_cli_reports_bad_input_without_traceback(tmp_path, tiny_gguf):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("nope")
    done = run_mtpd("bench", "--prompts", str(prompts), "--model", str(tiny_gguf), "--spec", "off",
                    "--json", str(tmp_path / "r.json"))
    assert done.returncode == 2
    assert "mtpd: error:" in done.stderr and "Traceback" not in done.stderr
    missing = run_mtpd("generate", "--model", str(tmp_path / "none.gguf"), "hi")
    assert missing.returncode == 2 and "no such GGUF file" in missing.stderr


def test_speculative_policy_without_a_drafter_is_refused(tmp_path, tiny_gguf):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(PROMPTS[0]))
    done = run_mtpd("bench", "--prompts", str(prompts), "--model", str(tiny_gguf), "--drafter", "none",
                    "--spec", "fixed:2", "--json", str(tmp_path / "r.json"))
    assert done.returncode == 2 and "needs a drafter" in done.stderr
    done = run_mtpd("generate", "--model", str(tiny_gguf), "--spec", "fixed:99", "hi")
    assert done.returncode == 2 and "K in fixed:K" in done.stderr


def test_bench_reports_acceptance_by_position(tiny_gguf):
    from daemon.models.loading import load

    lm = load(str(tiny_gguf), drafter="random")
    report = run_bench(lm, PROMPTS[:1], ["off", "fixed:3"], max_tokens=12)
    spec = next(r for r in report["results"] if r["spec"] == "fixed:3")
    assert len(spec["drafted_by_position"]) == 3 and spec["drafted"] == sum(spec["drafted_by_position"])
    off = next(r for r in report["results"] if r["spec"] == "off")
    assert spec["token_ids"] == off["token_ids"]
    row = next(s for s in report["summary"] if s["spec"] == "fixed:3" and s["category"] == "all")
    assert row["acceptance"] is not None and len(row["acceptance_by_position"]) <= 3

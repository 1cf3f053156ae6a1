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
flag, `serve --host --speculation --log-level`, `train-drafter [--resume]`, `inspect`, `drafter
extract --bits` and the extracted folder as `--drafter`, `service install --config` and `service
logs --follow`. The default model where the README runs it; the tiny model where the model is not the point.
"""

import json
import re
from pathlib import Path

from conftest import run_mtpd

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

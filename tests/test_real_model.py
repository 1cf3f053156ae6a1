"""The embedded default model, through the command line a user types."""

import json
import re

import pytest
from conftest import run_mtpd
from test_blas import EXPECTED_BLAS

pytestmark = pytest.mark.real_model


def test_code_prompt_gives_a_python_function():
    done = run_mtpd("generate", "--max-tokens", "80", "Write a Python function that checks whether a number is prime.")
    assert done.returncode == 0, done.stderr
    assert re.search(r"def \w+\(", done.stdout)
    assert re.search(r"prompt tokens: \d+, completion tokens: \d+, [\d.]+ tok/s", done.stderr)
    assert EXPECTED_BLAS in done.stderr  # the log names the BLAS in use
    loaded = next(json.loads(line) for line in done.stderr.splitlines() if '"model loaded"' in line)
    column_major = "column_major" in loaded["speed_paths"]  # the start-up probe's choice (daemon.cpu.forms)
    # row-major copies of every block, beside column-major weights, under MKL only
    assert loaded["row_major_blocks"] == (30 if EXPECTED_BLAS == "Intel MKL" and column_major else 0)


def test_random_drafter_gives_the_same_tokens_as_off(tmp_path):
    import json

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps({"id": i, "category": c, "messages": [{"role": "user", "content": text}]})
            for i, (c, text) in enumerate(
                [("code", "Write a Python function that adds two numbers."), ("prose", "Describe a quiet morning.")]
            )
        )
    )
    out = tmp_path / "r.json"
    done = run_mtpd("bench", "--prompts", str(prompts), "--drafter", "random", "--spec", "off", "--spec", "fixed:1",
                    "--spec", "fixed:4", "--max-tokens", "24", "--json", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["drafter"] == "random"
    by_prompt = {}
    for row in report["results"]:
        by_prompt.setdefault(row["id"], {})[row["spec"]] = row
    for rows in by_prompt.values():
        assert rows["fixed:1"]["token_ids"] == rows["off"]["token_ids"] == rows["fixed:4"]["token_ids"]
        assert rows["fixed:4"]["drafted"] > 0


def test_shipped_drafter_is_accepted_and_lossless(tmp_path):
    import json

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "c", "category": "code", "messages": [
        {"role": "user", "content": "Write a Python function that returns the squares of a list of numbers."}]}))
    out = tmp_path / "r.json"
    done = run_mtpd("bench", "--prompts", str(prompts), "--spec", "off", "--spec", "fixed:3", "--spec", "adaptive",
                    "--max-tokens", "48", "--json", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["drafter"] == "smollm2-135m-instruct"  # loaded with the default model
    rows = {r["spec"]: r for r in report["results"]}
    assert rows["fixed:3"]["token_ids"] == rows["off"]["token_ids"] == rows["adaptive"]["token_ids"]
    assert rows["fixed:3"]["accepted"] > 0

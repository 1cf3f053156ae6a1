"""Writes the tests' tiny random checkpoints of the MTP families (released key layout, an MTP layer
each) into a folder, for `mtpd bench` / `mtpd inspect` runs on them:

    .venv/bin/python bench/tiny_checkpoints.py /tmp/tiny
    .venv/bin/mtpd bench --model /tmp/tiny/deepseek_v41 --prompts bench/prompts.jsonl --spec off \
        --spec fixed:2 --spec adaptive --max-tokens 48 --json /tmp/tiny/deepseek_v41.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

FAMILIES = ["deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite", "qwen3_5", "qwen3_next", "mimo", "deepseek_v41",
            "step3p5", "nemotron_h"]
SEVERAL = ["mimo", "deepseek_v41", "step3p5"]  # also written with three MTP layers, as FAMILY-3


def main(out: Path) -> None:
    import tiny
    from families import write_with_mtp

    from daemon.models.loading import load

    out.mkdir(parents=True, exist_ok=True)
    tiny.write_gguf(out / "tokenizer.gguf")
    lm = load(str(out / "tokenizer.gguf"), drafter="none")  # its tokenizer, written into every folder
    for family in FAMILIES:
        write_with_mtp(out / family, family, lm.tokenizer, lm.config["vocab_size"], seed=1)
        print(out / family)
    for family in SEVERAL:
        write_with_mtp(out / f"{family}-3", family, lm.tokenizer, lm.config["vocab_size"], seed=3, layers=3)
        print(out / f"{family}-3")


if __name__ == "__main__":
    from daemon.cpu.blas import reexec_with_blas

    reexec_with_blas(sys.argv)
    main(Path(sys.argv[1]))

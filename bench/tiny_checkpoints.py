"""Writes the tests' tiny random checkpoints of the MTP families (released key layout, an MTP layer
each), and a tiny Qwen3 target with block drafters beside it (DFlash, DSpark as released), into a
folder, for `mtpd bench` / `mtpd inspect` runs on them:

    .venv/bin/python bench/tiny_checkpoints.py /tmp/tiny
    .venv/bin/mtpd bench --model /tmp/tiny/deepseek_v41 --prompts bench/prompts.jsonl --spec off \
        --spec fixed:2 --spec adaptive --max-tokens 48 --json /tmp/tiny/deepseek_v41.json
    .venv/bin/mtpd bench --model /tmp/tiny/qwen3 --drafter /tmp/tiny/dspark --prompts bench/prompts.jsonl \
        --spec off --spec fixed:4 --spec adaptive --max-tokens 48 --json /tmp/tiny/dspark.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

FAMILIES = ["deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite", "qwen3_5", "qwen3_next", "mimo", "deepseek_v41",
            "step3p5", "nemotron_h"]
SEVERAL = ["mimo", "deepseek_v41", "step3p5"]  # also written with three MTP layers, as FAMILY-3
BLOCKS = {  # block drafters for the qwen3 target (tests/blocks.py)
    "dflash": dict(kind="dflash", layer_ids=[0, 1], block_size=8),
    "dspark": dict(kind="dspark", layer_ids=[-1, 1], block_size=5, markov="vanilla", confidence=True, with_markov=True),
}


def main(out: Path) -> None:
    import tiny
    from blocks import write_block_drafter
    from families import write_family, write_with_mtp

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
    write_family(out / "qwen3", "qwen3", lm.tokenizer, lm.config["vocab_size"], seed=2)
    for name, args in BLOCKS.items():
        write_block_drafter(out / name, vocab=lm.config["vocab_size"], target_layers=2, **args)
        print(out / name)


if __name__ == "__main__":
    from daemon.cpu.blas import reexec_with_blas

    reexec_with_blas(sys.argv)
    main(Path(sys.argv[1]))

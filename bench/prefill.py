"""Prefill of long prompts on a CPU: the default model's blocks with long attention in NumPy
(daemon.cpu.long_attention) against the same blocks with MLX's attention (mlx-lm's own block for
chunks past 16 rows), interleaved per prompt length, both ways on the same loaded model.

    LD_PRELOAD=<OpenBLAS> python bench/prefill.py --tokens 1024 4096 8000 --rounds 3 \\
        --json bench/results/prefill.json

Reported per length: the fastest prefill of `rounds` each way (ms), their ratio, and whether the
last position's logits agree (max |difference|, and the same argmax).
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from daemon.engine.forward import prefill
from daemon.models.loading import load


def timed(model, ids) -> tuple[float, mx.array]:
    cache = make_prompt_cache(model)
    start = time.perf_counter()
    logits = prefill(model, cache, ids)
    mx.eval(logits)
    return time.perf_counter() - start, logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8000])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    lm = load(None, drafter="none")
    print(json.dumps({"speed_paths": lm.forms.name, "probe_ms": lm.forms.probe_ms}))
    blocks = lm.model.model.layers
    rows = []
    for n in args.tokens:
        ids = [(i * 7919) % 40000 + 100 for i in range(n)]  # a fixed, varied prompt
        best = {"mlx": float("inf"), "numpy": float("inf")}
        logits = {}
        for r in range(args.rounds):
            for way in (("mlx", "numpy") if r % 2 == 0 else ("numpy", "mlx")):
                for block in blocks:
                    block.use_long_rows(way == "numpy")
                seconds, logits[way] = timed(lm.model, ids)
                best[way] = min(best[way], seconds)
        gap = mx.abs(logits["mlx"] - logits["numpy"]).max().item()
        same = mx.argmax(logits["mlx"]).item() == mx.argmax(logits["numpy"]).item()
        row = {"tokens": n, "mlx_ms": round(best["mlx"] * 1e3, 1), "numpy_ms": round(best["numpy"] * 1e3, 1),
               "speedup": round(best["mlx"] / best["numpy"], 3), "max_logit_gap": gap, "same_argmax": same}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"speed_paths": lm.forms.name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

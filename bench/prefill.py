"""Long contexts on a CPU: the default model's blocks with long attention in NumPy
(daemon.cpu.long_attention) against the same blocks with MLX's attention (mlx-lm's own block for
chunks past 16 rows), interleaved per prompt length, both ways on the same loaded model: the
prompt's prefill, then forwards after it of one row (a plain decode step) and of 5 rows (a
verification of 4 drafts).

    python bench/prefill.py --tokens 1024 4096 8000 --rounds 3 --json bench/results/prefill.json

under the BLAS that MTPD_BLAS picks (preloaded like the `mtpd` command does).

Reported per length: the fastest prefill of `rounds` each way (ms), their ratio, whether the last
position's logits agree (max |difference|, and the same argmax), and the median of `--steps`
forwards of 1 and of 5 rows each way (ms) with their ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from daemon.cpu.blas import reexec_with_blas
from daemon.engine.forward import prefill
from daemon.models.loading import load


def timed(model, ids) -> tuple[float, mx.array, list]:
    cache = make_prompt_cache(model)
    start = time.perf_counter()
    logits = prefill(model, cache, ids)
    mx.eval(logits)
    return time.perf_counter() - start, logits, cache


def forwards(model, cache, rows: int, steps: int) -> list[float]:
    """The times of `steps` forwards of `rows` new rows after the cache's context, each taken back."""
    times = []
    for i in range(steps):
        start = time.perf_counter()
        mx.eval(model(mx.array([[100 + i + j for j in range(rows)]]), cache=cache))
        times.append(time.perf_counter() - start)
        trim_prompt_cache(cache, rows)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8000])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="forwards of 1 and of 5 rows after each prefill")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    reexec_with_blas(sys.argv)
    lm = load(None, drafter="none")
    print(json.dumps({"speed_paths": lm.forms.name, "probe_ms": lm.forms.probe_ms}))
    blocks = lm.model.model.layers
    rows = []
    for n in args.tokens:
        ids = [(i * 7919) % 40000 + 100 for i in range(n)]  # a fixed, varied prompt
        best = {"mlx": float("inf"), "numpy": float("inf")}
        logits, steps = {}, {(way, width): [] for way in best for width in (1, 5)}
        for r in range(args.rounds):
            for way in (("mlx", "numpy") if r % 2 == 0 else ("numpy", "mlx")):
                for block in blocks:
                    block.use_long_rows(way == "numpy")
                seconds, logits[way], cache = timed(lm.model, ids)
                best[way] = min(best[way], seconds)
                for width in (1, 5):
                    steps[way, width] += forwards(lm.model, cache, width, args.steps)
        gap = mx.abs(logits["mlx"] - logits["numpy"]).max().item()
        same = mx.argmax(logits["mlx"]).item() == mx.argmax(logits["numpy"]).item()
        row = {"tokens": n, "mlx_ms": round(best["mlx"] * 1e3, 1), "numpy_ms": round(best["numpy"] * 1e3, 1),
               "speedup": round(best["mlx"] / best["numpy"], 3), "max_logit_gap": gap, "same_argmax": same}
        for width in (1, 5):
            ms = {way: statistics.median(steps[way, width]) * 1e3 for way in best}
            row |= {f"{width}_row_mlx_ms": round(ms["mlx"], 1), f"{width}_row_numpy_ms": round(ms["numpy"], 1),
                    f"{width}_row_speedup": round(ms["mlx"] / ms["numpy"], 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"speed_paths": lm.forms.name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""Time one forward of the default model over 1, 2, 3, 4 and 9 new rows (~200 tokens of context),
as loaded by mlx-lm (`stock`) and by mtpd (column-major weights, FastBlocks, row-major copies for
1-3 rows under MKL), under the BLAS that MTPD_BLAS picks (the script preloads it like the `mtpd`
command). Medians in ms, interleaved.

    .venv/bin/python bench/forward.py [--repeats 12]
    MTPD_BLAS=openblas .venv/bin/python bench/forward.py
"""

import argparse
import statistics
import sys
import time

from daemon.cpu.blas import blas_in_use, reexec_with_blas

ROWS = (1, 2, 3, 4, 9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    reexec_with_blas(sys.argv)

    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    from daemon.models.loading import load

    models = {"stock": load(None, drafter="none", stock=True).model, "mtpd": load(None, drafter="none").model}
    caches = {}
    for name, model in models.items():
        caches[name] = make_prompt_cache(model)
        mx.eval(model(mx.array([list(range(100, 300))]), cache=caches[name]))
    times = {(name, rows): [] for name in models for rows in ROWS}
    for repeat in range(args.repeats + 3):
        for (name, rows), samples in times.items():
            x = mx.array([list(range(5, 5 + rows))])
            start = time.perf_counter()
            mx.eval(models[name](x, cache=caches[name]))
            if repeat >= 3:
                samples.append(time.perf_counter() - start)
            trim_prompt_cache(caches[name], rows)
    print(f"BLAS: {blas_in_use()}")
    print("rows     " + "".join(f"{rows:>8}" for rows in ROWS))
    for name in models:
        print(f"{name:<9}" + "".join(f"{statistics.median(times[name, rows]) * 1000:>8.1f}" for rows in ROWS))


if __name__ == "__main__":
    main()

"""Draft policies in a batch, in-process: N sequences of bench/prompts.jsonl stepped together in one
`daemon.engine.batch.Batch` (as the server's worker makes it), each policy in turn, repeated, so the
machine's drift is interleaved away; no HTTP, no arrivals spread out (bench/load.py has those).

    .venv/bin/python bench/batch.py --sequences 8 --specs off adaptive fixed:1 --reps 3 --max-tokens 96

Prints, per repetition and policy, the seconds of the batch's steps, tokens/s and the speed-up over
`off` in that repetition, drafted and accepted tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from daemon.cpu.blas import reexec_with_blas

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--specs", nargs="+", default=["off", "adaptive", "fixed:1"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()
    reexec_with_blas(sys.argv)

    from daemon.engine.batch import Batch
    from daemon.engine.generate import sequence
    from daemon.engine.records import Finished, Request
    from daemon.models.registry import registry
    from daemon.server.loaded import load_for_serving
    from daemon.settings import Settings
    from policies.registry import make_policy

    settings = Settings()
    loaded = load_for_serving(settings, next(iter(registry(settings).values())))
    lm, shared = loaded.lm, loaded.shared
    prompts = [json.loads(line) for line in (ROOT / "bench" / "prompts.jsonl").read_text().splitlines() if line.strip()]
    step = max(len(prompts) // args.sequences, 1)
    chosen = [prompts[(i * step) % len(prompts)] for i in range(args.sequences)]
    requests = [Request(tuple(lm.tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True)), args.max_tokens)
                for p in chosen]
    for rep in range(args.reps):
        seconds = {}
        for spec in args.specs:
            done: dict[int, Finished] = {}
            batch = Batch(lm.model, lambda owner, r, done=done: done.__setitem__(owner, r) if isinstance(r, Finished) else None,
                          settings.max_batch_rows, shared.rows if shared else None, shared.costs.t_draft if shared else 0.0,
                          lm.drafter, shared)
            for i, request in enumerate(requests):
                batch.add(i, sequence(lm, request, make_policy(spec, shared), loaded.tie_margin, chunk=lambda: 64, batched=True))
            started = time.perf_counter()
            while batch.running:
                batch.step()
            seconds[spec] = time.perf_counter() - started
            tokens = sum(f.completion_tokens for f in done.values())
            drafted = sum(f.stats.drafted for f in done.values())
            accepted = sum(f.stats.accepted for f in done.values())
            over = f" x{seconds['off'] / seconds[spec]:.2f} over off" if "off" in seconds else ""
            print(f"rep {rep} {spec:10s} {seconds[spec]:6.2f} s {tokens / seconds[spec]:6.1f} tok/s{over}"
                  f"  drafted {drafted} accepted {accepted}", flush=True)


if __name__ == "__main__":
    main()

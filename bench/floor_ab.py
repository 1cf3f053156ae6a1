"""Interleaved A/B of the adaptive policy's confidence floor: `off`, `adaptive`, and `adaptive` with
the floor at 0 (each with estimates of its own), prompt by prompt; speed-ups over `off` per category
(daemon.bench.run.summarize, as `mtpd bench` reports them; `python bench/table.py` reads the JSON).

    .venv/bin/python bench/floor_ab.py --json bench/results/floor-ab.json [--max-tokens 96]
"""

import argparse
import collections
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from daemon.cpu.blas import reexec_with_blas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="bench/prompts.jsonl")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    reexec_with_blas(sys.argv)

    from daemon.bench.run import WARMUP_TOKENS, read_prompts, run_engine, summarize
    from daemon.engine.calibration import machine, shared_estimates
    from daemon.engine.records import Request
    from daemon.models.loading import load
    from daemon.models.prompts import encode_chat, encode_text
    from policies.adaptive import AdaptivePolicy, SharedEstimates
    from policies.fixed import Fixed

    class NoFloor(AdaptivePolicy):
        def plan(self, offer, content_class):
            return dataclasses.replace(super().plan(offer, content_class), min_confidence=0.0)

    lm = load(None)
    shared = shared_estimates(lm, root=Path(tempfile.mkdtemp()))  # a fresh probe, as a new daemon's
    unfloored = SharedEstimates.load(shared.path)
    policies = {"off": lambda: Fixed(0), "adaptive": lambda: AdaptivePolicy(shared), "no-floor": lambda: NoFloor(unfloored)}
    requests = []
    for p in read_prompts(args.prompts):
        ids = encode_chat(lm.tokenizer, p["messages"]) if "messages" in p else encode_text(lm.tokenizer, p["prompt"])
        requests.append((p, Request(tuple(ids), max_tokens=args.max_tokens)))
    for make in policies.values():
        run_engine(lm, make(), Request(requests[0][1].prompt_ids, max_tokens=WARMUP_TOKENS), None, 0.0)
    results = []
    for p, request in requests:
        for name, make in policies.items():
            r = run_engine(lm, make(), request, None, 0.0)
            results.append({"id": p["id"], "category": p["category"], "spec": name, **r})
            print(f"{p['id']} {name}: {r['completion_tokens'] / r['seconds']:.1f} tok/s", file=sys.stderr, flush=True)
    summary = summarize(results, list(policies))
    answers = collections.defaultdict(set)
    for r in results:
        answers[r["id"]].add(tuple(r["token_ids"]))
    identical = sum(len(a) == 1 for a in answers.values())
    report = {"machine": machine(), "summary": summary, "identical": identical, "results": results}
    Path(args.json).write_text(json.dumps(report))
    for row in summary:
        print(f"{row['category']:6} {row['spec']:9} x{row['speedup_vs_off']:.3f}")
    print(f"token ids identical across the three for {identical}/{len(answers)} prompts")


if __name__ == "__main__":
    main()

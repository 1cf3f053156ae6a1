"""Interleaved A/B of the adaptive policy's confidence floor: `off`, `adaptive`, and `adaptive` with
the floor at 0 (each with estimates of its own), prompt by prompt; speed-ups over `off` per category.

    .venv/bin/python bench/floor_ab.py --json bench/results/floor-ab.json [--max-tokens 96]
"""

import argparse
import collections
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from daemon.blas import reexec_with_blas

CATEGORIES = ("code", "math", "mixed", "prose", "all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="bench/prompts.jsonl")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    reexec_with_blas(sys.argv)

    from daemon.bench import WARMUP_TOKENS, read_prompts, run_engine
    from daemon.calibration import shared_estimates
    from daemon.models import load
    from daemon.prompts import encode_chat, encode_text
    from daemon.records import Request
    from policies.adaptive import AdaptivePolicy, SharedEstimates
    from policies.fixed import Fixed

    class NoFloor(AdaptivePolicy):
        def plan(self, *offer):
            return dataclasses.replace(super().plan(*offer), min_confidence=0.0)

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
    totals = collections.defaultdict(lambda: [0, 0.0])
    for r in results:
        for c in (r["category"], "all"):
            totals[c, r["spec"]][0] += r["completion_tokens"]
            totals[c, r["spec"]][1] += r["seconds"]
    speedups = {c: {s: totals[c, s][0] / totals[c, s][1] / (totals[c, "off"][0] / totals[c, "off"][1]) for s in policies}
                for c in CATEGORIES if totals[c, "off"][1]}
    answers = collections.defaultdict(set)
    for r in results:
        answers[r["id"]].add(tuple(r["token_ids"]))
    identical = sum(len(a) == 1 for a in answers.values())
    Path(args.json).write_text(json.dumps({"speedup_vs_off": speedups, "identical": identical, "results": results}))
    for c, row in speedups.items():
        print(f"{c:6} " + "  ".join(f"{s} x{v:.3f}" for s, v in row.items()))
    print(f"token ids identical across the three for {identical}/{len(answers)} prompts")


if __name__ == "__main__":
    main()

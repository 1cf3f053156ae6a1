"""1 rank against 2 and 3 on loopback: `mtpd bench` per placement, off and adaptive interleaved
within each, and whether every prompt's ids match 1 rank's.

On one machine the ranks share its cores and talk over loopback, so this measures the cost of
splitting a model (the round trips of every forward), not a speed-up: a cluster is for a model that
does not fit one machine.

    python bench/cluster.py [--prompts bench/prompts.jsonl] [--per-category 1] [--max-tokens 64]

It also times one extra trip between two ranks for what a drafter on another rank than rank 0
would need each round (the hidden states it reads there, its drafts back), against a drafter step
on rank 0, where mtpd keeps it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLACEMENTS = {  # name: extra flags
    "1 rank": [],
    "2 ranks, pipeline": ["--hosts", "127.0.0.1,127.0.0.1"],
    "3 ranks, pipeline": ["--hosts", "127.0.0.1,127.0.0.1,127.0.0.1"],
    "3 ranks, tensor": ["--hosts", "127.0.0.1,127.0.0.1,127.0.0.1", "--split", "tensor"],
}


def pick(path: Path, per_category: int) -> list[dict]:
    prompts, seen = [], {}
    for line in path.read_text().splitlines():
        p = json.loads(line)
        if seen.get(p["category"], 0) < per_category:
            seen[p["category"]] = seen.get(p["category"], 0) + 1
            prompts.append(p)
    return prompts


def bench(prompts: Path, flags: list[str], max_tokens: int, out: Path) -> dict:
    env = {**os.environ, "MTPD_CACHE_DIR": tempfile.mkdtemp(prefix="mtpd-cluster-")}  # each placement probes its own costs
    argv = [sys.executable, "-m", "daemon", "bench", "--prompts", str(prompts), "--spec", "off", "--spec", "adaptive",
            "--max-tokens", str(max_tokens), "--json", str(out), *flags]
    subprocess.run(argv, check=True, env=env, cwd=ROOT)
    return json.loads(out.read_text())


TRIP_ROWS = (1, 4, 8)  # a decode row, a verification of 3 drafts, of 7
TRIPS = 200


def trip_rank(rank: int, ring: str, width: int) -> None:
    """One of two ranks: rank 0 sends [1, n, width] and gets it back, TRIPS times per row count."""
    import time

    import mlx.core as mx

    from daemon.cluster.launch import join_ring

    group = join_ring(json.loads(ring), rank)
    seconds = {}
    for n in TRIP_ROWS:
        h = mx.ones((1, n, width))
        start = time.perf_counter()
        for _ in range(TRIPS):
            if rank == 0:
                mx.eval(mx.distributed.send(h, 1, group=group))
                mx.eval(mx.distributed.recv_like(h, 1, group=group))
            else:
                mx.eval(mx.distributed.send(mx.distributed.recv_like(h, 0, group=group), 0, group=group))
        seconds[n] = (time.perf_counter() - start) / TRIPS
    if rank == 0:
        print(json.dumps(seconds))


def trips(width: int) -> dict:
    """Seconds per extra round trip of [1, n, width] fp32 on loopback, by n."""
    from daemon.cluster.hosts import loopback_ring

    ring = json.dumps(loopback_ring(2))
    argv = [sys.executable, __file__, "--trip-rank"]
    procs = [subprocess.Popen([*argv, str(r), ring, str(width)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
             for r in (0, 1)]
    out = [p.communicate()[0] for p in procs]
    return {int(k): v for k, v in json.loads(out[0]).items()}


def main() -> None:
    if sys.argv[1:2] == ["--trip-rank"]:
        return trip_rank(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=Path, default=ROOT / "bench" / "prompts.jsonl")
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "cluster.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mtpd-cluster-bench-"))
    subset = work / "prompts.jsonl"
    subset.write_text("".join(json.dumps(p) + "\n" for p in pick(args.prompts, args.per_category)))
    reports = {name: bench(subset, flags, args.max_tokens, work / f"{i}.json")
               for i, (name, flags) in enumerate(PLACEMENTS.items())}
    ids = {name: {(r["id"], r["spec"]): r["token_ids"] for r in rep["results"]} for name, rep in reports.items()}
    rows = []
    for name, rep in reports.items():
        rate = {s["spec"]: s["tokens_per_second"] for s in rep["summary"] if s["category"] == "all"}
        same = sum(ids[name][k] == v for k, v in ids["1 rank"].items())
        rows.append({"placement": name, "off_tok_s": rate["off"], "adaptive_tok_s": rate["adaptive"],
                     "adaptive_vs_off": rate["adaptive"] / rate["off"], "ids_as_1_rank": f"{same}/{len(ids['1 rank'])}"})
    trip = trips(576 * 3)  # the default drafter reads the final state and blocks 9 and 19
    args.json.write_text(json.dumps({"machine": reports["1 rank"]["machine"], "max_tokens": args.max_tokens,
                                     "extra_trip_seconds_by_rows": trip, "drafter": reports["1 rank"]["drafter"],
                                     "prompts": [json.loads(line)["id"] for line in subset.read_text().splitlines()],
                                     "rows": rows, "reports": reports}, indent=1))
    print("| placement | off tok/s | adaptive tok/s | adaptive vs off | ids as 1 rank |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['placement']} | {r['off_tok_s']:.1f} | {r['adaptive_tok_s']:.1f} | x{r['adaptive_vs_off']:.2f} "
              f"| {r['ids_as_1_rank']} |")
    print("extra round trip of the drafter's inputs, ms by rows:", {n: round(s * 1000, 3) for n, s in trip.items()})


if __name__ == "__main__":
    main()

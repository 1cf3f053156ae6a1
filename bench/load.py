"""Load check for a running daemon: N requests from C concurrent clients, mixed streaming and not.

    python bench/load.py --url http://127.0.0.1:8000 --requests 200 --clients 8 --json bench/results/load.json

Counts errors and lost responses (a response is lost when it has no finish_reason or its usage
disagrees with what arrived) and reports latency percentiles (whole request, and time to first
token for streams).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import statistics
import time
from pathlib import Path

import openai

TOPICS = ["a binary search in Python", "the water cycle", "a haiku about autumn", "what a mutex is",
          "a SQL query counting orders per day", "why the sky is blue", "a bash loop over files",
          "how 17 * 23 is computed", "a short story opening", "a Rust struct for a point"]


def one(client, model: str, i: int) -> dict:
    rng = random.Random(i)
    stream = i % 2 == 1
    kw = dict(model=model, max_tokens=rng.randint(8, 32), temperature=rng.choice([0, 0.7]), seed=i,
              messages=[{"role": "user", "content": f"Write {rng.choice(TOPICS)}. ({i})"}])
    start = time.perf_counter()
    if stream:
        first, text, usage, finish = None, [], None, None
        for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
            if chunk.choices:
                if chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter() - start
                text.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        complete = finish is not None and usage is not None and usage.completion_tokens >= 1
        return {"i": i, "stream": True, "seconds": time.perf_counter() - start, "ttft": first, "complete": complete}
    answer = client.chat.completions.create(**kw)
    complete = answer.choices[0].finish_reason is not None and answer.usage.completion_tokens >= 1
    return {"i": i, "stream": False, "seconds": time.perf_counter() - start, "ttft": None, "complete": complete}


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.url + "/v1", api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    results, errors = [], []

    def run(i):
        try:
            return one(client, model, i)
        except Exception as e:  # counted, never hidden
            errors.append(f"{i}: {type(e).__name__}: {e}")
            return None

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        for r in pool.map(run, range(args.requests)):
            if r is not None:
                results.append(r)
    wall = time.perf_counter() - start
    seconds = [r["seconds"] for r in results]
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    report = {
        "requests": args.requests, "clients": args.clients, "wall_s": round(wall, 1),
        "errors": len(errors), "error_samples": errors[:5],
        "lost": args.requests - len(errors) - sum(r["complete"] for r in results),
        "latency_p50_s": round(percentile(seconds, 50), 3), "latency_p95_s": round(percentile(seconds, 95), 3),
        "stream_ttft_p50_s": round(percentile(ttfts, 50), 3) if ttfts else None,
        "stream_ttft_p95_s": round(percentile(ttfts, 95), 3) if ttfts else None,
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

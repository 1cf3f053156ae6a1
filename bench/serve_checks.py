"""Prompt-cache and disconnect figures for the daemon on the default model (README, "Serving").

    python bench/serve_checks.py --json bench/results/serve-checks.json

1. Chat turn 2 vs turn 1 (same long system prompt): cached prompt tokens and time to first token.
2. Restart on the same cache folder: a new conversation with a known system prompt vs an unseen one.
3. A client that disconnects mid-stream: time from the disconnect until the next request's first
   token, vs. that request's time to first token on an idle daemon.
Times are client-side, one run each on a shared machine: read them as ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import Daemon  # noqa: E402  (the test suite's subprocess daemon)

SYSTEM = (
    "You are assistant number {n} of a code review team. You review Python and shell scripts. Answer "
    "briefly and precisely, show code in fenced blocks, prefer the standard library, name the edge cases "
    "you see, never invent APIs, and say so when you are unsure. For every function you write, give its "
    "signature with type hints, a one-line docstring and a short example of its use, then one test."
)
MODEL = "SmolLM2-135M-Instruct"


def ttft(client, messages, max_tokens=8) -> tuple[float, int, str]:
    """(seconds to the first content, cached prompt tokens, answer)."""
    start, first, text, cached = time.perf_counter(), None, [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
    return first, cached, "".join(text)


def turns(client, reps: int) -> dict:
    rows = []
    for n in range(reps):
        one = [{"role": "system", "content": SYSTEM.format(n=n)}, {"role": "user", "content": "Reverse a string."}]
        t1, c1, answer = ttft(client, one, 24)
        two = [*one, {"role": "assistant", "content": answer}, {"role": "user", "content": "Now without slicing."}]
        t2, c2, _ = ttft(client, two)
        rows.append({"turn1_ttft_s": t1, "turn1_cached": c1, "turn2_ttft_s": t2, "turn2_cached": c2})
    ratio = statistics.median(r["turn2_ttft_s"] / r["turn1_ttft_s"] for r in rows)
    return {"rows": rows, "median_ttft_ratio_turn2_vs_turn1": ratio}


def restart(cache_dir: Path, reps: int) -> dict:
    daemon = Daemon(cache_dir=cache_dir)
    try:
        client = daemon.client()
        rows = []
        for n in range(reps):
            known = [{"role": "system", "content": SYSTEM.format(n=n)}, {"role": "user", "content": "Sum a list."}]
            unseen = [{"role": "system", "content": SYSTEM.format(n=1000 + n)}, {"role": "user", "content": "Sum a list."}]
            tk, ck, _ = ttft(client, known)
            tu, cu, _ = ttft(client, unseen)
            rows.append({"known_ttft_s": tk, "known_cached": ck, "unseen_ttft_s": tu, "unseen_cached": cu})
        ratio = statistics.median(r["known_ttft_s"] / r["unseen_ttft_s"] for r in rows)
        return {"rows": rows, "median_ttft_ratio_known_vs_unseen": ratio}
    finally:
        daemon.stop()


def disconnect(daemon: Daemon, client, reps: int) -> dict:
    probe = [{"role": "user", "content": "Name a colour."}]
    rows = []
    for _ in range(reps):
        idle, _, _ = ttft(client, probe)
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story about the sea."}],
                "max_tokens": 400, "temperature": 0, "stream": True}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        for _ in range(4):
            response.fp.readline()
        conn.sock.close()
        conn.close()
        after, _, _ = ttft(client, probe)
        rows.append({"idle_ttft_s": idle, "after_disconnect_ttft_s": after})
    return {"rows": rows, "aborted_request_max_tokens": 400,
            "median_extra_s": statistics.median(r["after_disconnect_ttft_s"] - r["idle_ttft_s"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    daemon = Daemon()
    try:
        client = daemon.client()
        ttft(client, [{"role": "user", "content": "Hello."}])  # warm-up
        report = {"turns": turns(client, args.reps), "disconnect": disconnect(daemon, client, args.reps)}
    finally:
        daemon.stop()
    report["restart"] = restart(daemon.cache_dir, args.reps)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""Soak: mixed traffic from several clients for many minutes, the daemon's memory sampled as it goes
(issue 36: RSS at the end of a 30-minute run within 5% of RSS at 10 minutes, nothing lost).

    python bench/soak.py --minutes 30 --json bench/results/soak.json --plot bench/results/soak.png
    python bench/soak.py --minutes 1 --model tiny.gguf --drafter random   # other args go to `mtpd serve`
    python bench/soak.py --url http://127.0.0.1:8000 --pid 1234           # a daemon already running

It starts `mtpd serve` itself on a free loopback port (its own cache and config folders; settings
from the flags it passes through only), or attaches to `--url` (and `--pid` for /proc). Each client
goes through the request kinds in a seeded shuffled order, one round after another, and sends no
more once time is up and it has finished its first round (so every kind runs at least once): OpenAI
chat (plain, streamed, a forced tool call, a `response_format` json_schema), /v1/completions,
Anthropic messages (plain, streamed), and a stream dropped after a few chunks. Prompts come from
bench/prompts.jsonl and bench/tool-prompts.jsonl, max_tokens from 16 to 96, greedy or sampled.
A 5xx, a connection error, a timeout or an answer without its finish counts as failed; the exit
status is 1 if any request failed. Every `--sample` seconds it reads VmRSS, RssAnon and VmSwap
from /proc/PID/status and `GET /health`'s `memory` object (when the daemon has one).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import anthropic
import openai
from load import ROOT, free_port

HEALTH_MEMORY = ("rss_bytes", "mlx_active_bytes", "mlx_cache_bytes", "mlx_peak_bytes", "prompt_cache_bytes")
PROC_MEMORY = {"VmRSS": "vm_rss", "RssAnon": "rss_anon", "VmSwap": "vm_swap"}
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
                 "required": ["answer"]}
DROP_AFTER = 3  # SSE chunks a dropped stream reads before it hangs up
MiB = 2**20


@dataclass
class Clients:
    url: str
    model: str
    openai: openai.AsyncOpenAI
    anthropic: anthropic.AsyncAnthropic
    http: aiohttp.ClientSession


@dataclass
class Tally:
    """Every request's outcome: an HTTP status, or "lost", "timeout", "connection", "error"."""

    t0: float
    by_kind: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    sent: int = 0
    failures: list[dict] = field(default_factory=list)

    def record(self, kind: str, status: int | str, error: str | None = None) -> None:
        self.by_kind[kind][str(status)] += 1
        if not isinstance(status, int) or status >= 500:
            self.failures.append({"t": round(time.monotonic() - self.t0, 1), "kind": kind, "status": status,
                                  "error": error})

    def totals(self) -> dict:
        answered = sum(n for c in self.by_kind.values() for s, n in c.items() if s.isdigit())
        return {"sent": self.sent, "answered": answered, "failed": len(self.failures)}


async def chat(c: Clients, prompt: dict, max_tokens: int, temperature: float, **extra) -> bool:
    r = await c.openai.chat.completions.create(model=c.model, messages=prompt["messages"], max_tokens=max_tokens,
                                               temperature=temperature, **extra)
    return bool(r.choices and r.choices[0].finish_reason)


async def chat_stream(c: Clients, prompt: dict, max_tokens: int, temperature: float) -> bool:
    stream = await c.openai.chat.completions.create(model=c.model, messages=prompt["messages"], max_tokens=max_tokens,
                                                    temperature=temperature, stream=True)
    finish = None
    async for chunk in stream:
        if chunk.choices:
            finish = chunk.choices[0].finish_reason or finish
    return finish is not None


async def completion(c: Clients, prompt: dict, max_tokens: int, temperature: float) -> bool:
    text = "\n".join(m["content"] for m in prompt["messages"])
    r = await c.openai.completions.create(model=c.model, prompt=text, max_tokens=max_tokens, temperature=temperature)
    return bool(r.choices and r.choices[0].finish_reason)


async def messages(c: Clients, prompt: dict, max_tokens: int, temperature: float) -> bool:
    r = await c.anthropic.messages.create(model=c.model, messages=prompt["messages"], max_tokens=max_tokens,
                                          extra_body={"temperature": temperature})  # gone from the current client
    return r.stop_reason is not None


async def messages_stream(c: Clients, prompt: dict, max_tokens: int, temperature: float) -> bool:
    stream = await c.anthropic.messages.create(model=c.model, messages=prompt["messages"], max_tokens=max_tokens,
                                               extra_body={"temperature": temperature}, stream=True)
    stopped = False
    async for event in stream:
        stopped = stopped or event.type == "message_stop"
    return stopped


async def tool_call(c: Clients, prompt: dict, max_tokens: int, temperature: float) -> bool:
    return await chat(c, prompt, max_tokens, temperature, tools=prompt["tools"], tool_choice="required")


async def json_schema(c: Clients, prompt: dict, max_tokens: int, temperature: float) -> bool:
    schema = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}
    return await chat(c, prompt, max_tokens, temperature, response_format=schema)


async def dropped_stream(c: Clients, prompt: dict, max_tokens: int, temperature: float) -> bool:
    """Reads a few chunks of a streamed chat, then closes the connection mid-answer."""
    body = {"model": c.model, "messages": prompt["messages"], "max_tokens": max_tokens, "temperature": temperature,
            "stream": True}
    async with c.http.post(c.url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        chunks = 0
        async for line in r.content:
            chunks += line.startswith(b"data:")
            if chunks == DROP_AFTER:
                break
        r.close()  # hang up: the connection is not returned to the pool
    return chunks > 0


KINDS = {f.__name__: f for f in (chat, chat_stream, completion, messages, messages_stream, tool_call, json_schema,
                                 dropped_stream)}


async def attempt(tally: Tally, kind: str, request) -> None:
    tally.sent += 1
    try:
        tally.record(kind, 200 if await request else "lost")
    except (openai.APIStatusError, anthropic.APIStatusError) as e:
        tally.record(kind, e.status_code, str(e)[:300])
    except aiohttp.ClientResponseError as e:
        tally.record(kind, e.status, e.message[:300])
    except (TimeoutError, openai.APITimeoutError, anthropic.APITimeoutError) as e:
        tally.record(kind, "timeout", repr(e)[:300])
    except (openai.APIConnectionError, anthropic.APIConnectionError, aiohttp.ClientError) as e:
        tally.record(kind, "connection", repr(e)[:300])
    except Exception as e:  # noqa: BLE001 - a malformed answer the clients cannot parse is a failure too
        tally.record(kind, "error", repr(e)[:300])


async def client(c: Clients, tally: Tally, rng: random.Random, prompts: dict, deadline: float) -> None:
    for n in itertools.count():
        if n >= len(KINDS) and time.monotonic() >= deadline:
            return  # only after a whole first round, so that every kind runs at least once
        if n % len(KINDS) == 0:
            deck = rng.sample(list(KINDS), len(KINDS))
        kind = deck[n % len(KINDS)]
        prompt = rng.choice(prompts["tools" if kind == "tool_call" else "plain"])
        await attempt(tally, kind, KINDS[kind](c, prompt, rng.randint(16, 96), rng.choice((0.0, 0.7))))


def proc_memory(pid: int | None) -> dict:
    """VmRSS, RssAnon and VmSwap in bytes (empty without /proc, as on macOS)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines() if pid else []
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {key: int(fields[name].split()[0]) * 1024 for name, key in PROC_MEMORY.items() if name in fields}


async def health(c: Clients) -> dict | None:
    try:
        async with c.http.get(c.url + "/health", timeout=aiohttp.ClientTimeout(total=10)) as r:
            return await r.json()
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return None


async def sample(c: Clients, pid: int | None, tally: Tally) -> dict:
    h = await health(c)
    memory = (h or {}).get("memory") or {}
    row = {"t": round(time.monotonic() - tally.t0, 1), **proc_memory(pid),
           **{k: memory.get(k) for k in HEALTH_MEMORY}, "health": h is not None,
           "running": (h or {}).get("running"), "waiting": (h or {}).get("waiting"), **tally.totals()}
    row["rss"] = row.get("vm_rss") or row["rss_bytes"]
    row["anon_swap"] = row["rss_anon"] + row.get("vm_swap", 0) if "rss_anon" in row else None
    rss = f"{row['rss'] / MiB:.0f} MiB" if row["rss"] else "?"
    print(f"[{row['t']:7.1f} s] {row['sent']} sent, {row['answered']} answered, {row['failed']} failed, RSS {rss}",
          file=sys.stderr, flush=True)
    return row


async def settle(c: Clients, seconds: float = 30) -> bool:
    """Whether the daemon holds no request once every client is done (dropped streams freed)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        h = await health(c)
        if h and h.get("running") == 0 and h.get("waiting") == 0:
            return True
        await asyncio.sleep(0.5)
    return False


async def soak(url: str, pid: int | None, clients: int, minutes: float, every: float, seed: int,
               timeout: float) -> dict:
    plain = [json.loads(line) for f in ("prompts", "tool-prompts")
             for line in (ROOT / "bench" / f"{f}.jsonl").read_text().splitlines() if line.strip()]
    prompts = {"plain": [{"messages": p["messages"]} for p in plain], "tools": [p for p in plain if "tools" in p]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        c = Clients(url, "", openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout),
                    anthropic.AsyncAnthropic(base_url=url, api_key="none", max_retries=0, timeout=timeout), http)
        c.model = (await health(c) or {}).get("model", "default")
        tally = Tally(time.monotonic())
        samples = [await sample(c, pid, tally)]
        deadline = tally.t0 + minutes * 60
        load = asyncio.gather(*(client(c, tally, random.Random(f"{seed}/{n}"), prompts, deadline)
                                for n in range(clients)))
        while not load.done():
            await asyncio.wait([load], timeout=every)
            if not load.done():  # the last sample comes once the daemon has settled
                samples.append(await sample(c, pid, tally))
        await load  # a client's own bug surfaces here
        idle = await settle(c)
        samples.append(await sample(c, pid, tally))
    return {"url": url, "pid": pid, "model": c.model, "clients": clients, "minutes": minutes, "seed": seed,
            "sample_s": every, "requests": {**tally.totals(), "by_kind": {k: dict(v) for k, v in tally.by_kind.items()}},
            "idle_after": idle, "memory": marks(samples, minutes), "failures": tally.failures[:100], "samples": samples}


def marks(samples: list[dict], minutes: float) -> dict:
    """RSS and RssAnon + VmSwap at the start, a third of the way (10 min of 30) and the end."""
    end = samples[-1]
    third = min(samples, key=lambda s: abs(s["t"] - minutes * 20))
    out = {name: {k: s[k] for k in ("t", "rss", "anon_swap")} for name, s in
           (("start", samples[0]), ("third", third), ("end", end))}
    out["end_over_third"] = {k: round(end[k] / third[k], 4) if end[k] and third[k] else None
                             for k in ("rss", "anon_swap")}
    return out


def summary(report: dict) -> str:
    r, m = report["requests"], report["memory"]
    lines = [f"{r['sent']} requests sent, {r['answered']} answered, {r['failed']} failed; "
             f"daemon idle after: {report['idle_after']}"]
    lines += [f"  {kind:16} " + ", ".join(f"{s}: {n}" for s, n in sorted(c.items())) for kind, c in
              sorted(r["by_kind"].items())]
    for key, label in (("rss", "RSS"), ("anon_swap", "RssAnon+VmSwap")):
        if m["end"][key] is None:
            continue
        at = ", ".join(f"{m[p][key] / MiB:.1f} MiB at {m[p]['t'] / 60:.1f} min" for p in ("start", "third", "end"))
        lines.append(f"{label}: {at}; end / third = {m['end_over_third'][key]}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    from daemon.bench.plot import pyplot

    plt = pyplot()
    samples = report["samples"]
    minutes = [s["t"] / 60 for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=(2, 1))
    for key, label in (("vm_rss", "RSS"), ("rss_anon", "RssAnon"), ("mlx_active_bytes", "MLX active"),
                       ("mlx_cache_bytes", "MLX cache"), ("prompt_cache_bytes", "prompt cache")):
        points = [(x, s[key] / MiB) for x, s in zip(minutes, samples) if s.get(key) is not None]
        if points:
            top.plot(*zip(*points), label=label)
    top.set_ylabel("MiB")
    top.set_ylim(bottom=0)
    top.legend(fontsize=8)
    bottom.plot(minutes, [s["answered"] for s in samples], label="answered")
    bottom.plot(minutes, [s["failed"] for s in samples], label="failed", color="red")
    bottom.set_ylabel("requests (cumulative)")
    bottom.set_xlabel("minutes")
    bottom.legend(fontsize=8)
    fig.suptitle(f"soak: {report['model']}, {report['clients']} clients of mixed traffic", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def start_daemon(extra: list[str], work: Path) -> tuple[subprocess.Popen, str]:
    """`mtpd serve` as a user starts it, like the tests' Daemon: its own cache and config folders."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTPD_")}
    env.update(MTPD_CACHE_DIR=str(work / "cache"), XDG_CONFIG_HOME=str(work / "config"))
    log = (work / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "serve", "--port", str(port), *extra],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # a fresh cache folder means calibrating at start
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mtpd serve exited {proc.returncode}, see {work / 'serve.log'}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"mtpd serve did not start, see {work / 'serve.log'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)  # so that `mtpd serve`'s own flags pass through whole
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--sample", type=float, default=10, help="seconds between memory samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300, help="seconds before a request counts as unanswered")
    ap.add_argument("--url", default=None, help="a running daemon instead of starting one")
    ap.add_argument("--pid", type=int, default=None, help="its process id, to read /proc/PID/status")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args, extra = ap.parse_known_args()
    if args.url and extra:
        ap.error(f"{' '.join(extra)}: `mtpd serve` arguments need a daemon started here (no --url)")
    proc, url, pid = None, args.url, args.pid
    if not url:
        work = Path(tempfile.mkdtemp(prefix="mtpd-soak-"))
        print(f"starting mtpd serve {' '.join(extra)} (log: {work / 'serve.log'})", file=sys.stderr, flush=True)
        proc, url = start_daemon(extra, work)
        pid = proc.pid  # the BLAS re-exec keeps the process id
    try:
        report = asyncio.run(soak(url.rstrip("/"), pid, args.clients, args.minutes, args.sample, args.seed,
                                  args.timeout))
    finally:
        if proc:
            proc.terminate()
            code = proc.wait(60)
    if proc:
        report["daemon_exit"] = code
        report["serve_args"] = extra
    print(summary(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)
    sys.exit(1 if report["requests"]["failed"] else 0)


if __name__ == "__main__":
    main()

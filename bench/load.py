"""Many clients at once: aggregate and per-request speed and time to first token at 1, 2, 4 and 8
concurrent clients, for mtpd with speculation, mtpd with `off`, and mlx-lm's own server batching
the same weights (its `BatchGenerator`; it batches only without a draft model).

    python bench/load.py --clients 1 2 4 8 --rounds 2 --max-tokens 96 \\
        --json bench/results/load.json --png bench/results/load.png

It starts the three servers itself on loopback (mtpd on the default model and shipped drafter,
mlx-lm's on the same fp32 weights exported to an mlx-lm folder, under the same BLAS), then for
each client count runs every server in turn (interleaved, so the machine's drift hits all alike).
Each client streams `rounds` greedy requests one after another, prompts from bench/prompts.jsonl;
client c starts c * `stagger` seconds into the phase (arrivals spread out, as from independent
users, rather than every prompt landing in the same instant).
Reported per (server, clients): completion tokens/s over the phase's wall time, the median
request's tokens/s after its first token, p50/p95 time to first token, errors and lost answers
(no finish reason, or usage disagreeing with what arrived). Greedy answers of mtpd are compared
across client counts and between its two servers: batching must not change a token.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
SERVERS = ("mtpd adaptive", "mtpd off", "mlx-lm server")
BEFORE = "mtpd adaptive before"  # --before DIR: the daemon of another checkout (python -m daemon from there)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_for_mlx_lm(folder: Path) -> Path:
    """The default model's fp32 weights (as mtpd runs them on a CPU), config and tokenizer as an
    mlx-lm model folder."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from daemon.models.loading import load

    lm = load(None, drafter="none", stock=True)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(lm.model.parameters())))
    (folder / "config.json").write_text(json.dumps(lm.config))
    lm.tokenizer._tokenizer.save_pretrained(str(folder))
    return folder


def start(name: str, port: int, work: Path, before: Path | None) -> subprocess.Popen:
    from daemon.cpu.blas import find_blas

    log = open(work / f"{name.replace(' ', '-')}.log", "w")
    root = ROOT
    if name.startswith("mtpd"):
        env = os.environ | {"MTPD_SPECULATION": name.split()[1], "MTPD_CACHE_DIR": str(work / name.replace(" ", "-")),
                            "MTPD_LOG_LEVEL": "warning"}
        command = [sys.executable, "-m", "daemon", "serve", "--port", str(port)]
        root = before if name == BEFORE else ROOT
    else:
        blas = find_blas()
        env = os.environ | ({"LD_PRELOAD": blas} if blas else {})
        command = [sys.executable, "-m", "mlx_lm.server", "--model", str(work / "mlx-lm-model"), "--port", str(port)]
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)


def wait_ready(client: openai.OpenAI, model: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            return
        except openai.APIConnectionError:
            time.sleep(1)
    raise TimeoutError("server did not answer")


def one(client: openai.OpenAI, model: str, prompt: dict, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = end = None
    text, usage, finish = [], None, None
    try:
        stream = client.chat.completions.create(model=model, messages=prompt["messages"], max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices:
                delta = chunk.choices[0].delta.content
                if delta:
                    first = first or time.perf_counter()
                    text.append(delta)
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        end = time.perf_counter()
    except openai.OpenAIError as e:
        return {"id": prompt["id"], "error": repr(e)[:200]}
    tokens = usage.completion_tokens if usage else 0
    return {
        "id": prompt["id"], "text": "".join(text), "tokens": tokens, "finish": finish,
        "lost": finish is None or usage is None or (tokens > 0 and not text),
        "ttft": (first or end) - start, "seconds": end - start,
        "decode_tps": (tokens - 1) / (end - first) if first and tokens > 1 and end > first else None,
    }


def phase(client: openai.OpenAI, model: str, prompts: list[dict], clients: int, rounds: int, max_tokens: int,
          stagger: float) -> dict:
    def run_client(c: int) -> list[dict]:
        time.sleep(c * stagger)  # clients arrive one after another, not all in the same instant
        return [one(client, model, prompts[(c * rounds + r) % len(prompts)], max_tokens) for r in range(rounds)]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answers = [a for batch in pool.map(run_client, range(clients)) for a in batch]
    wall = time.perf_counter() - start
    good = [a for a in answers if "error" not in a]
    ttft = sorted(a["ttft"] for a in good)
    rates = [a["decode_tps"] for a in good if a["decode_tps"]]
    return {
        "clients": clients, "requests": len(answers), "wall_s": round(wall, 2),
        "completion_tokens": sum(a["tokens"] for a in good),
        "aggregate_tps": round(sum(a["tokens"] for a in good) / wall, 2),
        "per_request_tps_p50": round(statistics.median(rates), 2) if rates else None,
        "ttft_p50_s": round(percentile(ttft, 50), 3) if ttft else None,
        "ttft_p95_s": round(percentile(ttft, 95), 3) if ttft else None,
        "errors": len(answers) - len(good), "lost": sum(a["lost"] for a in good),
        "answers": answers,
    }


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def identical(phases: list[dict]) -> dict:
    """Greedy answers of mtpd's servers: each (prompt) answer against its first one, anywhere."""
    first, same, total = {}, 0, 0
    for p in phases:
        if not p["server"].startswith("mtpd"):
            continue
        for a in p["answers"]:
            if "text" not in a:
                continue
            key = a["id"]
            if key not in first:
                first[key] = (a["text"], a["tokens"])
                continue
            total += 1
            same += (a["text"], a["tokens"]) == first[key]
    return {"identical": same, "compared": total, "prompts": len(first)}


def plot(report: dict, path: Path) -> None:
    from daemon.bench.plot import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    for server in (*SERVERS, BEFORE):
        rows = [p for p in report["phases"] if p["server"] == server]
        if not rows:
            continue
        x = [p["clients"] for p in rows]
        axes[0].plot(x, [p["aggregate_tps"] for p in rows], marker="o", label=server)
        axes[1].plot(x, [p["per_request_tps_p50"] or 0 for p in rows], marker="o", label=server)
        axes[2].plot(x, [p["ttft_p95_s"] or 0 for p in rows], marker="o", label=server)
    for ax, title in zip(axes, ("aggregate completion tokens / s", "median request tokens / s",
                                "p95 time to first token (s)")):
        ax.set_title(title)
        ax.set_xlabel("concurrent clients")
        ax.set_xticks(report["clients"])
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report['model']} on {report['machine']}, {report['max_tokens']} tokens per answer", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=2, help="requests each client sends one after another")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--stagger", type=float, default=0.5, help="seconds between one client's start and the next's")
    ap.add_argument("--prompts", type=Path, default=ROOT / "bench" / "prompts.jsonl")
    ap.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    ap.add_argument("--before", type=Path, default=None, help="also run mtpd adaptive from this checkout")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args()
    from daemon.engine.calibration import machine

    prompts = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    servers = args.servers + ([BEFORE] if args.before else [])
    work = Path(tempfile.mkdtemp(prefix="mtpd-load-"))
    if "mlx-lm server" in servers:
        export_for_mlx_lm(work / "mlx-lm-model")
    ports = {name: free_port() for name in servers}
    procs = {name: start(name, ports[name], work, args.before) for name in servers}
    clients = {name: openai.OpenAI(base_url=f"http://127.0.0.1:{ports[name]}/v1", api_key="none", timeout=900,
                                   max_retries=0) for name in servers}
    models = {name: "SmolLM2-135M-Instruct" for name in servers}
    try:
        for name in servers:
            if name == "mlx-lm server":
                models[name] = str(work / "mlx-lm-model")
            wait_ready(clients[name], models[name], procs[name])
            print(f"{name} ready", flush=True)
        phases = []
        for c in args.clients:
            for name in servers:
                result = phase(clients[name], models[name], prompts, c, args.rounds, args.max_tokens, args.stagger)
                phases.append({"server": name, **result})
                print(json.dumps({k: v for k, v in phases[-1].items() if k != "answers"}), flush=True)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(60)
    report = {"model": "SmolLM2-135M-Instruct", "machine": machine(), "clients": args.clients, "rounds": args.rounds,
              "max_tokens": args.max_tokens, "stagger_s": args.stagger, "greedy_identical": identical(phases), "phases": phases}
    print(json.dumps(report["greedy_identical"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.png:
        plot(report, args.png)


if __name__ == "__main__":
    from daemon.cpu.blas import reexec_with_blas

    reexec_with_blas(sys.argv)
    main()

"""The `mtpd` command line."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from daemon.arguments import parser
from daemon.cluster.faults import RankLost
from daemon.cpu.blas import reexec_with_blas


def _sampling(args):
    from daemon.engine.sampling import SamplingParams

    return SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)


MODEL_FLAGS = ("model", "drafter", "drafter_bits", "tie_margin", "hosts", "hostfile", "split")


def _settings(args, *flags: str):
    """The settings object serve uses, with the command line's flags on top."""
    from daemon.settings import load_settings

    return load_settings(args.config, {name: getattr(args, name) for name in MODEL_FLAGS + flags})[0]


def _load(settings, cluster=None, **overrides):
    """The model as the settings name it; `overrides` win over them (the baseline: stock, no drafter)."""
    import structlog

    from daemon.models.loading import describe, load

    options = {"drafter": settings.drafter, "drafter_bits": settings.drafter_bits, "lazy": cluster is not None}
    lm = load(settings.model, **(options | overrides))
    structlog.get_logger().info("model loaded", **describe(lm))
    if cluster is not None:
        cluster.join(lm)
    return lm


@contextlib.contextmanager
def _cluster(settings):
    """The cluster the settings ask for, its ranks started (None: one process); closed at the end."""
    from daemon.cluster.launch import Cluster

    cluster = Cluster.of(settings)
    try:
        yield cluster
    except RuntimeError as e:  # a rank gone mid-answer surfaces in MLX's collectives
        lost = cluster.fault(e) if cluster is not None else None
        if lost is None:
            raise
        raise lost from e
    finally:
        if cluster is not None:
            cluster.close()


def cmd_generate(args) -> None:
    settings = _settings(args)
    with _cluster(settings) as cluster:
        _generate(args, settings, _load(settings, cluster))


def _generate(args, settings, lm) -> None:
    from daemon.engine.calibration import shared_estimates
    from daemon.engine.generate import generate
    from daemon.engine.records import Finished, Request
    from daemon.models.prompts import encode_chat, encode_text
    from policies.registry import ADAPTIVE, make_policy

    spec = args.spec or settings.speculation
    spec = spec if lm.drafter is not None or spec not in ADAPTIVE else "off"
    shared = shared_estimates(lm, root=settings.cache_dir) if spec in ADAPTIVE else None
    policy = make_policy(spec, shared)
    if policy.name != "off" and lm.drafter is None:
        raise ValueError(f"--spec {spec} needs a drafter (--drafter)")
    if args.raw:
        ids = encode_text(lm.tokenizer, args.prompt)
    else:
        ids = encode_chat(lm.tokenizer, [{"role": "user", "content": args.prompt}])
    request = Request(tuple(ids), args.max_tokens or settings.default_max_tokens, _sampling(args), tuple(args.stop))
    for record in generate(lm, request, policy, tie_margin=settings.tie_margin):
        if isinstance(record, Finished):
            print(flush=True)
            print(_summary_line(record), file=sys.stderr)
        else:
            print(record.text, end="", flush=True)
    if shared is not None:
        shared.save()


def _summary_line(done) -> str:
    drafted = f", drafted {done.stats.drafted}, accepted {done.stats.accepted}" if done.stats.drafted else ""
    return (f"prompt tokens: {done.prompt_tokens}, completion tokens: {done.completion_tokens}, "
            f"{done.tokens_per_second:.1f} tok/s, time to first token {done.ttft_seconds:.2f} s, "
            f"finish: {done.finish_reason}{drafted}")


def cmd_bench(args) -> None:
    from daemon.bench.run import read_prompts

    if args.plot:
        from daemon.bench.plot import pyplot

        pyplot()  # a missing extra fails now, not after the run
    settings = _settings(args)
    prompts = read_prompts(args.prompts)
    if args.baseline and (settings.hosts or settings.hostfile):
        raise ValueError("--baseline runs in this process alone: leave out --hosts / --hostfile")
    with _cluster(settings) as cluster:
        _bench(args, settings, prompts, _load(settings, cluster))


def _bench(args, settings, prompts, lm) -> None:
    from daemon.bench.run import run_bench

    specs = list(dict.fromkeys(args.spec + ([args.baseline] if args.baseline else [])))
    report = run_bench(
        lm,
        prompts,
        specs,
        max_tokens=args.max_tokens or settings.default_max_tokens,
        repeat=args.repeat,
        sampling=_sampling(args),
        tie_margin=settings.tie_margin,
        verify_penalty=args.verify_penalty_ms / 1000,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        baseline=_load(settings, stock=True, drafter="none") if args.baseline else None,
        cache_dir=settings.cache_dir,
    )
    args.json_out.write_text(json.dumps(report, indent=1))
    if args.plot:
        from daemon.bench.plot import plot_report

        plot_report(report, args.plot)
    for row in report["summary"]:
        speedup = row["speedup_vs_off"]
        print(
            f"{row['spec']:>10} {row['category']:>14} {row['tokens_per_second']:7.2f} tok/s"
            + (f"  x{speedup:.3f} vs off" if speedup is not None else ""),
            file=sys.stderr,
        )


def cmd_train_drafter(args) -> None:
    import dataclasses

    from daemon.models.loading import load
    from daemon.training.settings import TrainSettings
    from daemon.training.train import train_drafter

    overrides = {"tokens": args.tokens, "steps": args.steps, "chain_steps": args.chain_steps,
                 "chain_depths": args.chain_depths, "head_vocab": args.head_vocab, "feature_layers": args.feature_layers,
                 "read_offers": args.read_offers, "generate_workers": args.generate_workers, "kind": args.kind,
                 "block_size": args.block_size}
    settings = dataclasses.replace(TrainSettings(), **{k: v for k, v in overrides.items() if v is not None})
    lm = load(args.model, drafter="none")
    record = train_drafter(
        lm, args.out, settings, resume=args.resume, progress=lambda line: print(line, file=sys.stderr, flush=True)
    )
    print(json.dumps(record.get("held_out_first_position_acceptance") or record["held_out_block_acceptance"]))


def cmd_rank(args) -> None:
    from daemon.cluster.launch import follow

    follow(args.rank, args.split, json.loads(args.ring), args.model, args.drafter)


def cmd_serve(args) -> None:
    import asyncio

    from daemon.cluster.launch import Cluster
    from daemon.models.registry import registry
    from daemon.server.app import init_app, serve
    from daemon.server.loaded import load_for_serving
    from daemon.server.metrics import Metrics
    from daemon.server.worker import Limits, Worker
    from daemon.system import logs

    settings = _settings(args, "host", "port", "speculation", "log_level")
    logs.configure(settings.log_level)
    metrics = Metrics()
    cluster = Cluster.of(settings)
    models = registry(settings)
    if cluster is not None:  # a cluster serves its one model
        models = dict([next(iter(models.items()))])
    worker = Worker(lambda entry: load_for_serving(settings, entry, cluster if entry.source == "model" else None),
                    settings.max_queue, metrics, Limits.of(settings), models, settings.memory_budget())
    try:
        lost = asyncio.run(serve(init_app(settings, worker, metrics)))
    finally:
        if cluster is not None:
            cluster.close()
    if lost is not None:
        print(f"mtpd: error: {lost}", file=sys.stderr, flush=True)
        os._exit(1)  # not a clean exit: MLX's threads may still wait on the lost rank


def cmd_service(args) -> None:
    import subprocess

    from daemon.settings import load_settings
    from daemon.system.service import default_manager, describe, execute, service_plan

    settings, _ = load_settings(args.config)
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--env wants KEY=VALUE, not {item!r}")
        env[key] = value
    plan = service_plan(args.action, args.manager or default_manager(), Path.home(), env, args.config,
                        stop_seconds=settings.shutdown_timeout_s + 10, follow=args.follow)
    if args.dry_run:
        print(describe(plan))
        return
    code = execute(plan, lambda argv: subprocess.run(argv).returncode)
    if code:
        sys.exit(code)
    if args.action == "install":
        print(f"installed {plan.path}; the daemon starts now and at every login", file=sys.stderr)


def _health(settings) -> tuple[str, dict | None, str | None]:
    """The running daemon's address and its /health (None, and why, when it does not answer)."""
    import urllib.error
    import urllib.request

    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    where = f"http://{host}:{settings.port}"
    try:
        with urllib.request.urlopen(f"{where}/health", timeout=5) as r:
            return where, json.loads(r.read()), None
    except urllib.error.HTTPError as e:  # 503: a rank of its cluster is lost, and it is stopping
        return where, None, f"mtpd at {where}: {json.loads(e.read()).get('error', e.reason)}"
    except OSError:
        return where, None, f"no mtpd daemon is running at {where}/health"


def cmd_status(args) -> None:
    from daemon.settings import load_settings

    settings, _ = load_settings(args.config, {"port": args.port})
    where, health, trouble = _health(settings)
    if health is None:
        print(trouble, file=sys.stderr)
        sys.exit(1)
    rate = health.get("acceptance_rate")
    loaded = ", ".join(f"{m['name']} ({m['bytes'] / 2**20:.0f} MiB)" for m in health.get("loaded_models", []))
    print(
        f"mtpd at {where}: {health['model']} with drafter {health['drafter'] or 'none'}"
        + (f", {health['placement']}" if health.get("placement") else "") + "\n"
        f"loaded: {loaded}\n"
        f"up {health['uptime_s']:.0f} s, {health['requests_served']} requests served, "
        f"{health['running']} running, {health['waiting']} waiting\n"
        f"speculation: {health['speculation']}"
        + (f", acceptance {rate:.1%}" if rate is not None else ", nothing drafted yet")
        + (f", last request drafted in {health['last_request_speculation']['drafted_steps']} steps"
           if health.get("last_request_speculation") else "")
    )


def cmd_models(args) -> None:
    from daemon.models.registry import describe, registry
    from daemon.settings import load_settings

    settings, _ = load_settings(args.config, {"port": args.port})
    _, health, _ = _health(settings)
    loaded = {m["name"] for m in health.get("loaded_models", [])} if health is not None else set()
    rows = [describe(e) | {"loaded": e.name in loaded if health is not None else None}
            for e in registry(settings).values()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'name':<36} {'family':<14} {'size':>9}  {'mtp':>3}  {'loaded':<7} {'source':<10}  drafter")
    for r in rows:
        size = f"{r['bytes'] / 2**20:.0f} MiB" if "bytes" in r else "?"
        shown = {True: "yes", False: "no", None: "(down)"}[r["loaded"]]
        print(f"{r['name']:<36} {r.get('family') or 'unreadable':<14} {size:>9}  {r.get('mtp_layers', 0):>3}  "
              f"{shown:<7} {r['source']:<10}  {r.get('drafter', '-')}" + (f"  ({r['error']})" if "error" in r else ""))


def cmd_config(args) -> None:
    from daemon.settings import describe, load_settings

    print(describe(*load_settings(args.config)))


def cmd_inspect(args) -> None:
    from daemon.models.checkpoint import inspect

    print(json.dumps(inspect(args.path), indent=1))


def cmd_drafter(args) -> None:
    from daemon.models.checkpoint import extract

    print(json.dumps(extract(args.src, args.out, args.bits), indent=1))


COMMANDS = {
    "generate": cmd_generate,
    "bench": cmd_bench,
    "serve": cmd_serve,
    "config": cmd_config,
    "service": cmd_service,
    "status": cmd_status,
    "models": cmd_models,
    "train-drafter": cmd_train_drafter,
    "inspect": cmd_inspect,
    "drafter": cmd_drafter,
    "rank": cmd_rank,
}


LIGHT = ("config", "service", "status", "models")  # commands that run no model: no BLAS, nothing built


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from daemon.system import logs

    try:
        if argv is None and args.command not in LIGHT:
            command = ["-m", "daemon", *sys.argv[1:]] if sys.argv[0].endswith("__main__.py") else sys.argv
            reexec_with_blas(command)
        logs.configure()
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"mtpd: error: {e}", file=sys.stderr)
        sys.exit(2)
    except RankLost as e:
        print(f"mtpd: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)

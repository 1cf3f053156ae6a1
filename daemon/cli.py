"""The `mtpd` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from daemon.cluster.faults import RankLost
from daemon.cpu.blas import reexec_with_blas


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _model_args(p: argparse.ArgumentParser) -> None:
    """What serve, generate and bench share; unset flags fall back to the settings (TOML, MTPD_*)."""
    p.add_argument("--model", default=None, help="GGUF file, mlx-lm folder or repo id on disk")
    p.add_argument("--drafter", default=None,
                   help="MTP drafter folder; 'none' for no drafter; 'random' for random weights (testing). "
                        "Default: the MTP layer in the model's own checkpoint, if any")
    p.add_argument("--drafter-bits", type=int, choices=[8, 4, 3], default=None, help="quantize the drafter")
    p.add_argument("--tie-margin", type=float, default=None, help="near-tie guard margin (logits)")
    p.add_argument("--config", type=Path, default=None, help="TOML file (default: ~/.config/mtpd/config.toml)")
    p.add_argument("--hosts", default=None, help="one rank per host, this one first: H1,H2,... (MLX distributed, ring)")
    p.add_argument("--hostfile", type=Path, default=None, help="the hosts as an mlx.launch hostfile (JSON)")
    p.add_argument("--split", choices=["pipeline", "tensor"], default=None,
                   help="share the model out by layers (pipeline, default) or by heads (tensor)")


def _rank_parser(sub) -> None:
    r = sub.add_parser("rank")  # started by rank 0 of a cluster (daemon.cluster.launch), not by hand
    r.add_argument("--rank", type=int, required=True)
    r.add_argument("--split", required=True)
    r.add_argument("--ring", required=True, help="the ring backend's addresses (JSON)")
    r.add_argument("--model", default=None)
    r.add_argument("--drafter", default=None)


def _generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="stream one answer to stdout")
    g.add_argument("prompt")
    _model_args(g)
    g.add_argument("--spec", default=None, help="draft policy: adaptive | adaptive:mtp | off | fixed:K "
                                                "(default: the speculation setting)")
    g.add_argument("--max-tokens", type=_at_least_one, default=None, help="default: the default_max_tokens setting")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--raw", action="store_true", help="send the prompt as raw text, no chat template")
    _sampling_args(g)


def _bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="tokens/s per draft policy, interleaved, as JSON")
    b.add_argument("--prompts", required=True, type=Path, help="JSONL: id, category, messages|prompt")
    _model_args(b)
    b.add_argument("--spec", action="append", required=True,
                   help="draft policy: off | fixed:K | adaptive | adaptive:mtp (repeatable)")
    b.add_argument("--verify-penalty-ms", type=float, default=0.0,
                   help="simulate dear verification: count this many ms per verified draft (no waiting)")
    b.add_argument("--max-tokens", type=_at_least_one, default=None, help="default: the default_max_tokens setting")
    b.add_argument("--repeat", type=_at_least_one, default=1)
    b.add_argument("--baseline", choices=["mlx-lm"], default=None)
    b.add_argument("--json", required=True, type=Path, dest="json_out")
    b.add_argument("--plot", type=Path, default=None, help="also draw the results into this PNG (the `plot` extra)")
    _sampling_args(b)


def _serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="the OpenAI-compatible HTTP daemon (settings: see `mtpd config show`)")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    _model_args(s)
    s.add_argument("--speculation", default=None, help="default draft policy: adaptive | adaptive:mtp | off | fixed:K")
    s.add_argument("--log-level", default=None)


def _service_parsers(sub) -> None:
    c = sub.add_parser("config", help="the daemon's settings")
    show = c.add_subparsers(dest="config_command", required=True).add_parser(
        "show", help="print the effective settings and where each comes from"
    )
    show.add_argument("--config", type=Path, default=None)

    v = sub.add_parser("service", help="run `mtpd serve` as a launchd (macOS) or systemd (Linux) user service")
    v.add_argument("action", choices=["install", "uninstall", "start", "stop", "restart", "status", "logs"])
    v.add_argument("--manager", choices=["launchd", "systemd"], default=None, help="default: this OS's")
    v.add_argument("--dry-run", action="store_true", help="print the file and the commands; change nothing")
    v.add_argument("--config", type=Path, default=None, help="TOML file the service passes to `mtpd serve`")
    v.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for the service")
    v.add_argument("--follow", action="store_true", help="logs: keep printing new lines")

    st = sub.add_parser("status", help="ask the running daemon how it is doing")
    st.add_argument("--config", type=Path, default=None)
    st.add_argument("--port", type=int, default=None)


def _train_parser(sub) -> None:
    t = sub.add_parser("train-drafter", help="train an MTP drafter for a model that has none")
    t.add_argument("--model", default=None)
    t.add_argument("--out", required=True, type=Path, help="drafter folder to write")
    t.add_argument("--tokens", type=_at_least_one, default=None, help="target positions to train on")
    t.add_argument("--steps", type=_at_least_one, default=None)
    t.add_argument("--head-vocab", type=int, default=None, help="size of the draft head's vocabulary (0: full)")
    t.add_argument("--feature-layers", type=_blocks, default=None, metavar="N,M|none",
                   help="target blocks whose outputs the drafter also reads (default: a third and two thirds "
                        "up, 9,19 for the default model; none: the final hidden state alone)")
    t.add_argument("--read-offers", action=argparse.BooleanOptionalAction, default=None,
                   help="the drafter also reads what the context lookup offers as the token it drafts "
                        "(default: on; --no-read-offers for the plain MTP layout)")
    t.add_argument("--generate-workers", type=_at_least_one, default=None, metavar="N",
                   help="processes answering the training prompts at once, one BLAS thread each "
                        "(default: one per core on the CPU, one on Metal)")
    t.add_argument("--resume", action="store_true", help="continue a stopped run in --out")


def _checkpoint_parsers(sub) -> None:
    i = sub.add_parser("inspect", help="a checkpoint's family, its MTP layer and what mtpd will do with it (JSON)")
    i.add_argument("path", help="mlx-lm / Hugging Face model folder, or a GGUF file")
    d = sub.add_parser("drafter", help="drafter folders")
    e = d.add_subparsers(dest="drafter_command", required=True).add_parser(
        "extract", help="write a checkpoint's MTP layer as a drafter folder, reading only its tensors")
    e.add_argument("src", help="the checkpoint as released (or a conversion that kept the MTP layer)")
    e.add_argument("--out", required=True, type=Path, help="drafter folder to write (then: --drafter OUT)")
    e.add_argument("--bits", type=int, choices=[8, 4, 3], default=None, help="store it quantized")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="mtpd", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)
    for add in (_generate_parser, _bench_parser, _serve_parser, _service_parsers, _train_parser, _checkpoint_parsers,
                _rank_parser):
        add(sub)
    return root


def _sampling(args):
    from daemon.engine.sampling import SamplingParams

    return SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)


MODEL_FLAGS = ("model", "drafter", "drafter_bits", "tie_margin", "hosts", "hostfile", "split")


def _settings(args, *flags: str):
    """The settings object serve uses, with the command line's flags on top."""
    from daemon.settings import load_settings

    return load_settings(args.config, {name: getattr(args, name) for name in MODEL_FLAGS + flags})[0]


def _load(settings, cluster=None, **overrides):
    import structlog

    from daemon.models.loading import describe, load

    lm = load(settings.model, drafter=settings.drafter, drafter_bits=settings.drafter_bits, lazy=cluster is not None,
              **overrides)
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


def _at_least_one(text: str) -> int:
    """A count of processes: a whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return int(text)


def _blocks(text: str) -> tuple[int, ...]:
    """`--feature-layers`: "9,19" or "none"."""
    if text == "none":
        return ()
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block numbers like 9,19 or none, not {text!r}") from None


def cmd_train_drafter(args) -> None:
    import dataclasses

    from daemon.models.loading import load
    from daemon.training.settings import TrainSettings
    from daemon.training.train import train_drafter

    overrides = {"tokens": args.tokens, "steps": args.steps, "head_vocab": args.head_vocab, "feature_layers": args.feature_layers,
                 "read_offers": args.read_offers, "generate_workers": args.generate_workers}
    settings = dataclasses.replace(TrainSettings(), **{k: v for k, v in overrides.items() if v is not None})
    lm = load(args.model, drafter="none")
    record = train_drafter(
        lm, args.out, settings, resume=args.resume, progress=lambda line: print(line, file=sys.stderr, flush=True)
    )
    print(json.dumps(record["held_out_first_position_acceptance"]))


def cmd_rank(args) -> None:
    from daemon.cluster.launch import follow

    follow(args.rank, args.split, json.loads(args.ring), args.model, args.drafter)


def cmd_serve(args) -> None:
    import asyncio

    from daemon.cluster.launch import Cluster
    from daemon.server.app import init_app, serve
    from daemon.server.metrics import Metrics
    from daemon.server.worker import Limits, Worker, load_for_serving
    from daemon.system import logs

    settings = _settings(args, "host", "port", "speculation", "log_level")
    logs.configure(settings.log_level)
    metrics = Metrics()
    cluster = Cluster.of(settings)
    worker = Worker(lambda: load_for_serving(settings, cluster), settings.max_queue, metrics, Limits.of(settings))
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


def cmd_status(args) -> None:
    import urllib.error
    import urllib.request

    from daemon.settings import load_settings

    settings, _ = load_settings(args.config, {"port": args.port})
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    url = f"http://{host}:{settings.port}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            health = json.loads(r.read())
    except urllib.error.HTTPError as e:  # 503: a rank of its cluster is lost, and it is stopping
        print(f"mtpd at http://{host}:{settings.port}: {json.loads(e.read()).get('error', e.reason)}", file=sys.stderr)
        sys.exit(1)
    except OSError:
        print(f"no mtpd daemon is running at {url}", file=sys.stderr)
        sys.exit(1)
    rate = health.get("acceptance_rate")
    print(
        f"mtpd at http://{host}:{settings.port}: {health['model']} with drafter {health['drafter'] or 'none'}"
        + (f", {health['placement']}" if health.get("placement") else "") + "\n"
        f"up {health['uptime_s']:.0f} s, {health['requests_served']} requests served, "
        f"{health['running']} running, {health['waiting']} waiting\n"
        f"speculation: {health['speculation']}"
        + (f", acceptance {rate:.1%}" if rate is not None else ", nothing drafted yet")
        + (f", last request drafted in {health['last_request_speculation']['drafted_steps']} steps"
           if health.get("last_request_speculation") else "")
    )


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
    "train-drafter": cmd_train_drafter,
    "inspect": cmd_inspect,
    "drafter": cmd_drafter,
    "rank": cmd_rank,
}


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from daemon.system import logs

    try:
        if argv is None:
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

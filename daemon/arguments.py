"""The `mtpd` command line's arguments (daemon.cli runs the commands)."""

from __future__ import annotations

import argparse
from pathlib import Path


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


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _model_args(p: argparse.ArgumentParser) -> None:
    """What serve, generate and bench share; unset flags fall back to the settings (TOML, MTPD_*)."""
    p.add_argument("--model", default=None, help="GGUF file, mlx-lm folder or repo id on disk")
    p.add_argument("--drafter", default=None,
                   help="drafter folder (MTP, or a DFlash / DSpark block drafter as released); 'none' for no drafter; "
                        "'random' for random weights (testing). "
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
    ms = sub.add_parser("models", help="the models the daemon can serve: family, size, MTP layers, whether loaded")
    ms.add_argument("--config", type=Path, default=None)
    ms.add_argument("--port", type=int, default=None)
    ms.add_argument("--json", action="store_true", help="one JSON list instead of a table")


def _train_parser(sub) -> None:
    t = sub.add_parser("train-drafter", help="train an MTP drafter for a model that has none")
    t.add_argument("--model", default=None)
    t.add_argument("--out", required=True, type=Path, help="drafter folder to write")
    t.add_argument("--tokens", type=_at_least_one, default=None, help="target positions to train on")
    t.add_argument("--steps", type=_at_least_one, default=None, help="steps of the first stage (depth 1)")
    t.add_argument("--chain-steps", type=int, default=None, metavar="N",
                   help="steps of the second stage, the drafter fed its own output (default 500; 0: none)")
    t.add_argument("--chain-depths", type=_at_least_one, default=None, metavar="D",
                   help="draft positions the second stage trains together (default 4)")
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
    t.add_argument("--kind", choices=["chain", "block"], default=None,
                   help="chain: an MTP drafter chained on its own output (default); block: a block drafter, "
                        "a block of drafts per forward (DSpark's rows)")
    t.add_argument("--block-size", type=_at_least_one, default=None, metavar="B",
                   help="a block drafter's drafts per forward (default 8)")
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
    root = argparse.ArgumentParser(prog="mtpd", description="The `mtpd` command line.")
    sub = root.add_subparsers(dest="command", required=True)
    for add in (_generate_parser, _bench_parser, _serve_parser, _service_parsers, _train_parser, _checkpoint_parsers,
                _rank_parser):
        add(sub)
    return root

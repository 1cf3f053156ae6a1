"""`mtpd bench`: tokens/s per draft policy on a prompt set, interleaved so machine drift cancels.

Timing: `seconds` is decode time (first token to last) and `tokens_per_second` is
(completion_tokens - 1) / seconds (0 for an answer that ends at once); prefill is reported apart as
`ttft_seconds`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import mlx.core as mx

from daemon.cpu import few_rows
from daemon.engine.calibration import machine, shared_estimates
from daemon.engine.generate import generate
from daemon.engine.records import Finished, Request, SpecStats
from daemon.engine.sampling import SamplingParams
from daemon.models.loading import LoadedModel
from daemon.models.prompts import encode_chat, encode_text
from daemon.server.openai_shapes import ChatRequest
from daemon.server.prepare import Prepared, prepare
from daemon.server.worker import ServedModel
from daemon.settings import Settings
from policies.registry import ADAPTIVE, make_policy

BASELINE = "mlx-lm"
WARMUP_TOKENS = 16


def read_prompts(path: str | Path) -> list[dict]:
    """One JSON object per line: `id`, optional `category`, and `messages` or `prompt`; with
    `messages`, optionally the chat API's `tools`, `tool_choice` and `response_format`."""
    prompts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON: {e.msg}") from None
        if not isinstance(item, dict) or "id" not in item:
            raise ValueError(f"{path}:{number}: each line needs an object with an `id`")
        if not isinstance(item.get("messages"), list) and not isinstance(item.get("prompt"), str):
            raise ValueError(f"{path}:{number}: needs `messages` (a list) or `prompt` (a string)")
        prompts.append({"category": "uncategorized", **item})
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


CHAT_FIELDS = ("tools", "tool_choice", "response_format")


def prepared_chat(lm: LoadedModel, prompt: dict, max_tokens: int) -> Prepared:
    """A prompt line with tools or structured output, through the API's own path
    (daemon.server.prepare: the tools in the prompt, a forced call's opening, its grammar, the
    reader of its calls)."""
    body = ChatRequest.model_validate({"messages": prompt["messages"], "max_tokens": max_tokens,
                                       **{f: prompt[f] for f in CHAT_FIELDS if f in prompt}})
    return prepare(body, ServedModel.of(lm), Settings(context_overflow="clamp"))


def request_of(lm: LoadedModel, prompt: dict, max_tokens: int, sampling: SamplingParams) -> Request:
    """A prompt line as the engine's request."""
    if any(f in prompt for f in CHAT_FIELDS):
        return replace(prepared_chat(lm, prompt, max_tokens).request, sampling=sampling)
    ids = encode_chat(lm.tokenizer, prompt["messages"]) if "messages" in prompt else encode_text(lm.tokenizer, prompt["prompt"])
    return Request(tuple(ids), max_tokens=max_tokens, sampling=sampling)


def run_engine(lm: LoadedModel, policy, request: Request, tie_margin: float | None, verify_penalty: float) -> dict:
    finished = next(r for r in generate(lm, request, policy, tie_margin, verify_penalty) if isinstance(r, Finished))
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "ttft_seconds": finished.ttft_seconds,
        "seconds": finished.decode_seconds,
        **finished.stats.summary(),
        "draft_lengths": finished.stats.draft_lengths,
        "lookup_steps": finished.stats.lookup_steps,
        "token_ids": list(finished.token_ids),
    }


def run_mlx_lm(lm: LoadedModel, request: Request) -> dict:
    """mlx-lm's own generation loop, timed like ours."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    s = request.sampling
    sampler = make_sampler(s.temperature, top_p=s.top_p if s.top_p < 1 else 0.0, top_k=s.top_k)
    if s.seed is not None:
        mx.random.seed(s.seed)
    with few_rows.disabled():  # as its users run it: the BLAS's own sgemm for every product
        start = time.perf_counter()
        first = None
        tokens = []
        for response in stream_generate(
            lm.model, lm.tokenizer, mx.array(request.prompt_ids), max_tokens=request.max_tokens, sampler=sampler
        ):
            first = first or time.perf_counter()
            if response.finish_reason != "stop" or response.token not in lm.tokenizer.eos_token_ids:
                tokens.append(response.token)
        end = time.perf_counter()
        return {
            "prompt_tokens": len(request.prompt_ids),
            "completion_tokens": len(tokens),
            "ttft_seconds": (first or end) - start,
            "seconds": end - (first or end),
            **SpecStats().summary(),
            "token_ids": tokens,
        }


def acceptance_by_position(rows: list[dict]) -> list[float]:
    """Accepted / drafted at draft positions 1, 2, ... over `rows`."""
    drafted, accepted = [], []
    for r in rows:
        for totals, counts in ((drafted, r.get("drafted_by_position", [])), (accepted, r.get("accepted_by_position", []))):
            totals.extend([0] * (len(counts) - len(totals)))
            for j, n in enumerate(counts):
                totals[j] += n
    return [a / d for a, d in zip(accepted + [0] * (len(drafted) - len(accepted)), drafted) if d]


def acceptance_by_class(rows: list[dict]) -> dict[str, dict]:
    """Content class (as the classifier saw the text being written) -> drafted tokens and the share accepted."""
    totals: dict[str, list[int]] = {}
    for r in rows:
        for klass, (drafted, accepted) in r.get("by_class", {}).items():
            t = totals.setdefault(klass, [0, 0])
            t[0], t[1] = t[0] + drafted, t[1] + accepted
    return {k: {"drafted": d, "acceptance": a / d} for k, (d, a) in sorted(totals.items()) if d}


def summarize(results: list[dict], specs: list[str]) -> list[dict]:
    categories = sorted({r["category"] for r in results}) + ["all"]
    rows = []
    for category in categories:
        in_category = [r for r in results if category in ("all", r["category"])]
        rates = {}
        for spec in specs:
            mine = [r for r in in_category if r["spec"] == spec]
            seconds = sum(r["seconds"] for r in mine)
            decoded = sum(max(r["completion_tokens"] - 1, 0) for r in mine)
            drafted = sum(r["drafted"] for r in mine)
            copied = sum(r.get("lookup_drafted", 0) for r in mine)
            rates[spec] = decoded / seconds if seconds > 0 else 0.0
            rows.append(
                {
                    "spec": spec,
                    "category": category,
                    "tokens_per_second": rates[spec],
                    "acceptance": sum(r["accepted"] for r in mine) / drafted if drafted else None,
                    "acceptance_by_position": acceptance_by_position(mine),
                    "lookup_share": copied / drafted if drafted else None,
                    "lookup_acceptance": sum(r.get("lookup_accepted", 0) for r in mine) / copied if copied else None,
                    "mtp_acceptance": (
                        sum(r["accepted"] - r.get("lookup_accepted", 0) for r in mine) / (drafted - copied)
                        if drafted > copied else None
                    ),
                    "acceptance_by_class": acceptance_by_class(mine),
                }
            )
        for row in rows[-len(specs) :]:
            off = rates.get("off")
            row["speedup_vs_off"] = row["tokens_per_second"] / off if off else None
    return rows


def _runners(lm: LoadedModel, specs: list[str], shared, tie_margin, verify_penalty: float, baseline) -> dict:
    """spec -> a function that answers a Request and returns its result row; bad names fail here."""
    if lm.drafter is None and any(s not in ("off", BASELINE) for s in specs):
        raise ValueError(f"--spec {next(s for s in specs if s not in ('off', BASELINE))} needs a drafter (--drafter)")
    for spec in specs:
        if spec != BASELINE:
            make_policy(spec, shared)  # reject bad names before any work

    def runner(spec):
        if spec == BASELINE:
            return lambda req: run_mlx_lm(baseline or lm, req)
        return lambda req: run_engine(lm, make_policy(spec, shared), req, tie_margin, verify_penalty)

    return {spec: runner(spec) for spec in specs}


def run_bench(
    lm: LoadedModel,
    prompts: list[dict],
    specs: list[str],
    max_tokens: int,
    repeat: int = 1,
    sampling: SamplingParams = SamplingParams(),
    tie_margin: float | None = None,
    verify_penalty: float = 0.0,
    progress: Callable[[str], None] = lambda _: None,
    baseline: LoadedModel | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """`specs` may include "mlx-lm" for the baseline (on `baseline`: the same weights loaded with
    `stock=True`, as mlx-lm runs them; default `lm`); each prompt runs every spec in turn.
    `verify_penalty` (seconds counted per verified draft) makes speculation expensive on purpose.
    `cache_dir`: where the adaptive policy's calibration is kept (None: a fresh probe)."""
    shared = shared_estimates(lm, cache_dir, verify_penalty) if any(s in ADAPTIVE for s in specs) else None
    runners = _runners(lm, specs, shared, tie_margin, verify_penalty, baseline)
    requests = [request_of(lm, p, max_tokens, sampling) for p in prompts]

    for spec, run in runners.items():
        progress(f"warm-up {spec}")
        run(Request(requests[0].prompt_ids, max_tokens=WARMUP_TOKENS, sampling=sampling))

    results = []
    for n, (p, request) in enumerate(zip(prompts, requests), 1):
        for _ in range(repeat):
            for spec, run in runners.items():
                row = run(request)
                row["tokens_per_second"] = (
                    max(row["completion_tokens"] - 1, 0) / row["seconds"] if row["seconds"] > 0 else 0.0
                )
                results.append({"id": p["id"], "category": p["category"], "spec": spec, **row})
                progress(
                    f"[{n}/{len(prompts)}] {p['id']} {spec}: {row['completion_tokens']} tokens, "
                    f"{row['tokens_per_second']:.1f} tok/s"
                )
    if shared is not None:
        shared.save()
    return {
        "model": lm.name,
        "drafter": lm.drafter_name,
        "machine": machine(),
        "results": results,
        "summary": summarize(results, specs),
    }

"""Forced tool calls on the default model: every prompt of bench/tool-prompts.jsonl (tools with
`tool_choice` "required" or a named function, a few `response_format` schemas) under off, fixed:2
and adaptive, in one interleaved `mtpd bench` run; checks that each answer is a call whose arguments
validate against its tool's schema (or JSON that validates against the format's), that the token ids
are the same under every policy, and prints acceptance per content class.

    python bench/tool_calls.py [--max-tokens 96] [--prompts FILE] [--json bench/results/tool-calls.json]
"""

import argparse
import json
import sys
from pathlib import Path

from daemon.cpu.blas import reexec_with_blas

PROMPTS = Path(__file__).with_name("tool-prompts.jsonl")
SPECS = ["off", "fixed:2", "adaptive"]


def checked(lm, prompt: dict, token_ids: list[int]) -> str:
    """"ok", or what is wrong with the answer."""
    import jsonschema

    from daemon.bench.run import prepared_chat

    text = lm.tokenizer.decode(token_ids)
    if "response_format" in prompt:
        try:
            jsonschema.validate(json.loads(text), prompt["response_format"]["json_schema"]["schema"])
        except (ValueError, jsonschema.ValidationError) as e:
            return f"not valid JSON for the format: {str(e).splitlines()[0]}"
        return "ok"
    calls = prepared_chat(lm, prompt, 1).tool_calls  # the reader the server uses, a forced call's opening included
    calls.feed(text)
    calls.close()
    if not calls.calls:
        return f"no call in {text[:80]!r}"
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in prompt["tools"]}
    choice = prompt["tool_choice"]
    forced = choice["function"]["name"] if isinstance(choice, dict) else ""
    for call in calls.calls:
        name = call["function"]["name"]
        if name not in schemas or (forced and name != forced):
            return f"called {name!r}"
        try:
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[name])
        except (ValueError, jsonschema.ValidationError) as e:
            return f"{name}: {str(e).splitlines()[0]}"
    return "ok"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--prompts", type=Path, default=PROMPTS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    reexec_with_blas(sys.argv)

    from daemon.bench.run import read_prompts, run_bench
    from daemon.models.loading import load

    prompts = read_prompts(args.prompts)
    lm = load()
    report = run_bench(lm, prompts, SPECS, args.max_tokens, progress=lambda line: print(line, file=sys.stderr))
    by_id = {p["id"]: p for p in prompts}
    verdicts, same = {}, 0
    for pid in by_id:
        rows = {r["spec"]: r for r in report["results"] if r["id"] == pid}
        same += len({tuple(r["token_ids"]) for r in rows.values()}) == 1
        verdicts[pid] = {spec: checked(lm, by_id[pid], r["token_ids"]) for spec, r in rows.items()}
    valid = sum(all(v == "ok" for v in row.values()) for row in verdicts.values())
    for pid, row in verdicts.items():
        if any(v != "ok" for v in row.values()):
            print(f"{pid}: {row}")
    print(f"valid under every policy: {valid}/{len(prompts)}; token ids identical across policies: "
          f"{same}/{len(prompts)}")
    for row in report["summary"]:
        if row["category"] == "all":
            classes = ", ".join(f"{k} {v['acceptance']:.2f} of {v['drafted']}"
                                for k, v in row["acceptance_by_class"].items())
            speed = f"x{row['speedup_vs_off']:.2f} vs off" if row["speedup_vs_off"] else ""
            print(f"{row['spec']:>9}: {row['tokens_per_second']:.1f} tok/s {speed}; acceptance by class: {classes}")
    if args.json:
        args.json.write_text(json.dumps({**report, "verdicts": verdicts}, indent=1))


if __name__ == "__main__":
    main()

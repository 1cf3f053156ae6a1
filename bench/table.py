"""Markdown tables from `mtpd bench --json` reports: python bench/table.py REPORT.json"""

import json
import sys


def speed_table(report: dict) -> str:
    specs = list(dict.fromkeys(r["spec"] for r in report["summary"]))
    categories = list(dict.fromkeys(r["category"] for r in report["summary"]))
    cell = {(r["spec"], r["category"]): r for r in report["summary"]}
    lines = ["| policy | " + " | ".join(categories) + " |", "| --- |" + " --- |" * len(categories)]
    for spec in specs:
        row = []
        for c in categories:
            r = cell[spec, c]
            up = f" (x{r['speedup_vs_off']:.2f})" if r["speedup_vs_off"] is not None else ""
            row.append(f"{r['tokens_per_second']:.1f}{up}")
        lines.append(f"| {spec} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def acceptance_table(report: dict) -> str:
    rows = [r for r in report["summary"] if r.get("acceptance_by_position")]
    lines = ["| policy | category | overall | pos 1 | pos 2 | pos 3 | pos 4 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        pos = (r["acceptance_by_position"] + [None] * 4)[:4]
        fmt = [f"{p:.2f}" if p is not None else "" for p in pos]
        lines.append(f"| {r['spec']} | {r['category']} | {r['acceptance']:.2f} | " + " | ".join(fmt) + " |")
    return "\n".join(lines)


def lookup_table(report: dict) -> str:
    """For policies that copy from the context: what share of the drafts were copies, and how often
    copies and MTP drafts were accepted."""
    rows = [r for r in report["summary"] if r.get("lookup_share")]
    lines = ["| policy | category | copied share of drafts | copies accepted | MTP drafts accepted |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        fmt = [f"{r[k]:.2f}" if r.get(k) is not None else "" for k in ("lookup_share", "lookup_acceptance", "mtp_acceptance")]
        lines.append(f"| {r['spec']} | {r['category']} | " + " | ".join(fmt) + " |")
    return "\n".join(lines) if rows else ""


def identical(report: dict) -> str:
    by_prompt = {}
    for r in report["results"]:
        by_prompt.setdefault(r["id"], {})[r["spec"]] = r["token_ids"]
    same = sum(len({tuple(v) for k, v in specs.items() if k != "mlx-lm"}) == 1 for specs in by_prompt.values())
    return f"token ids identical across policies for {same}/{len(by_prompt)} prompts"


if __name__ == "__main__":
    for path in sys.argv[1:]:
        report = json.load(open(path))
        tables = (speed_table(report), acceptance_table(report), lookup_table(report), identical(report))
        print(f"### {path}\n\n{report['machine']}\n\n" + "\n\n".join(tables) + "\n")

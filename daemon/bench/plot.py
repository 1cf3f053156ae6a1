"""`mtpd bench --plot`: tokens/s and speed-up per policy and category, and the draft length the
adaptive policy chose along one answer (steps that copied from the context marked)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib's pyplot, off screen; a clear error where the `plot` extra is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'mtpd[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_report(report: dict, path: str | Path) -> None:
    import numpy as np

    plt = pyplot()

    summary = report["summary"]
    specs = list(dict.fromkeys(r["spec"] for r in summary))
    categories = list(dict.fromkeys(r["category"] for r in summary))
    cell = {(r["spec"], r["category"]): r for r in summary}
    trace = _longest_trace(report["results"])

    fig, axes = plt.subplots(1, 3 if trace else 2, figsize=(16 if trace else 11, 4.5))
    width = 0.8 / len(specs)
    x = np.arange(len(categories))
    for i, spec in enumerate(specs):
        tps = [cell[spec, c]["tokens_per_second"] for c in categories]
        up = [cell[spec, c]["speedup_vs_off"] or 0 for c in categories]
        axes[0].bar(x + i * width, tps, width, label=spec)
        axes[1].bar(x + i * width, up, width, label=spec)
    for ax, title in ((axes[0], "tokens / s"), (axes[1], "speed-up vs off")):
        ax.set_xticks(x + width * (len(specs) - 1) / 2, categories)
        ax.set_title(title)
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    axes[0].legend(fontsize=8)
    if trace:
        row, lengths = trace
        axes[2].step(range(len(lengths)), lengths, where="post", label="draft length")
        copied = [i for i, c in enumerate(row.get("lookup_steps", [])) if c]
        if copied:
            axes[2].scatter(copied, [lengths[i] for i in copied], s=10, color="tab:orange", label="copied by lookup")
            axes[2].legend(fontsize=8)
        axes[2].set_title(f"adaptive: draft length per step ({row['id']})")
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("k (0 = plain decoding)")
    fig.suptitle(f"{report['model']} + {report['drafter']} on {report['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _longest_trace(results: list[dict]):
    """The adaptive row whose draft lengths vary most: mixed content shows the switching."""
    rows = [r for r in results if r["spec"] == "adaptive" and r.get("draft_lengths")]
    if not rows:
        return None
    best = max(rows, key=lambda r: (len(set(r["draft_lengths"])), len(r["draft_lengths"])))
    return best, best["draft_lengths"]

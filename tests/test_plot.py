from daemon.bench.plot import plot_report


def test_plot_writes_a_png_with_the_adaptive_trace(tmp_path):
    summary = [
        {"spec": s, "category": c, "tokens_per_second": t, "speedup_vs_off": t / 10, "acceptance": None}
        for s, t in (("off", 10.0), ("fixed:2", 13.0), ("adaptive", 14.0))
        for c in ("code", "prose", "all")
    ]
    results = [{"id": "mixed-1", "spec": "adaptive", "draft_lengths": [0, 0, 2, 3, 3, 0, 1]}]
    report = {"model": "m", "drafter": "d", "machine": "x", "summary": summary, "results": results}
    plot_report(report, tmp_path / "bench.png")
    data = (tmp_path / "bench.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

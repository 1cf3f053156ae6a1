import struct

from daemon.bench.plot import _longest_trace, plot_report

SUMMARY = [
    {"spec": s, "category": c, "tokens_per_second": t, "speedup_vs_off": t / 10, "acceptance": None}
    for s, t in (("off", 10.0), ("fixed:2", 13.0), ("adaptive", 14.0))
    for c in ("code", "prose", "all")
]
MIXED = {"id": "mixed-1", "spec": "adaptive", "draft_lengths": [0, 0, 2, 3, 3, 0, 1]}
RESULTS = [
    {"id": "code-1", "spec": "adaptive", "draft_lengths": [3, 3, 3, 3, 3, 3, 3, 3]},
    MIXED,
    {"id": "mixed-1", "spec": "fixed:2", "draft_lengths": [2, 0, 1, 2, 3, 4, 5, 6]},
]


def png_width(path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", data[16:20])[0]


def test_the_trace_is_the_adaptive_answer_whose_draft_length_varies_most():
    assert _longest_trace(RESULTS) == (MIXED, MIXED["draft_lengths"])
    assert _longest_trace([r for r in RESULTS if r["spec"] != "adaptive"]) is None


def test_plot_draws_the_trace_as_a_third_panel(tmp_path):
    report = {"model": "m", "drafter": "d", "machine": "x", "summary": SUMMARY}
    plot_report({**report, "results": RESULTS}, tmp_path / "with.png")
    plot_report({**report, "results": RESULTS[2:]}, tmp_path / "without.png")
    assert png_width(tmp_path / "with.png") > 1.3 * png_width(tmp_path / "without.png")

"""The faster forms (FastBlocks, the column-major layout) are kept only where the start-up probe
times them faster than the forward mlx-lm runs; every form computes the same tokens."""

import pytest
from mlx_lm.models import llama

from daemon.cpu import activation, alternating, fast_block, forms, long_attention, ragged_attention, softmax
from daemon.cpu.forms import Forms
from daemon.engine.generate import generate
from daemon.engine.records import Request
from daemon.models.loading import describe, load

PROMPT = (1, 80, 120, 7, 200, 33, 150)


@pytest.fixture
def stock(tiny_gguf):
    return load(str(tiny_gguf), drafter="none", stock=True)


@pytest.mark.parametrize("faster, kept", [
    (Forms(fast_blocks=True), Forms(fast_blocks=True)),
    (Forms(column_major=True, fast_blocks=True), Forms(column_major=True, fast_blocks=True)),
    (Forms(), Forms(fast_blocks=True)),  # FastBlocks stay: the batch's one forward runs through them
])
def test_the_layout_timed_fastest_is_kept(stock, monkeypatch, faster, kept):
    current = {}
    apply = forms.apply

    def tracked(module, blocks, f):
        apply(module, blocks, f)
        current["forms"] = f

    monkeypatch.setattr(forms, "apply", tracked)
    monkeypatch.setattr(forms, "_seconds", lambda model, cache: 1.0 if current["forms"] == faster else 2.0)
    monkeypatch.setattr(long_attention, "probe", lambda *shape: (False, {"mlx": 5.0, "numpy": 6.0}))
    monkeypatch.setattr(activation, "probe", lambda width: (False, {"mlx_16": 1.0}))
    monkeypatch.setattr(softmax, "probe", lambda *heads: (False, {"mlx_4": 1.0}))
    monkeypatch.setattr(ragged_attention, "probe", lambda *shape: (False, {"mlx": 1.0}))
    chosen = forms.choose(stock.model, stock.model.layers, layout=True)
    assert chosen == kept and set(chosen.probe_ms) == {"stock", "fast_blocks", "fast_blocks+column_major",
                                                       "long_attention_mlx", "long_attention_numpy",
                                                       "activation_mlx_16", "softmax_mlx_4", "ragged_attention_mlx"}
    assert chosen.probe_ms[faster.name] == 1000.0
    assert type(stock.model.layers[0]) is fast_block.FastBlock


@pytest.mark.parametrize("faster", [True, False])
def test_long_attention_is_kept_only_where_the_probe_times_it_faster(stock, monkeypatch, faster):
    monkeypatch.setattr(forms, "_seconds", lambda model, cache: 1.0)
    shapes = []
    monkeypatch.setattr(long_attention, "probe", lambda *shape: shapes.append(shape) or (faster, {"mlx": 1.0, "numpy": 2.0}))
    chosen = forms.choose(stock.model, stock.model.layers, layout=True)
    attn = stock.model.layers[0].self_attn
    assert shapes == [(attn.n_heads, attn.n_kv_heads, attn.head_dim)]
    assert chosen.long_attention is faster and ("numpy_attention" in chosen.name) is faster
    assert all(block._long_rows is faster for block in stock.model.layers)
    assert forms.choose(stock.model, stock.model.layers, layout=False).long_attention is False  # a GPU: not timed


@pytest.mark.parametrize("faster", [True, False])
def test_the_numpy_activation_is_kept_only_where_the_probe_times_it_faster(stock, monkeypatch, faster):
    monkeypatch.setattr(forms, "_seconds", lambda model, cache: 1.0)
    monkeypatch.setattr(long_attention, "probe", lambda *shape: (False, {}))
    widths = []
    monkeypatch.setattr(activation, "probe", lambda width: widths.append(width) or (faster, {"mlx_16": 1.0}))
    chosen = forms.choose(stock.model, stock.model.layers, layout=True)
    assert widths == [stock.model.layers[0].mlp.gate_proj.weight.shape[0]]
    assert chosen.numpy_mlp is faster and ("numpy_mlp" in chosen.name) is faster
    assert all(block._numpy_mlp is faster for block in stock.model.layers)


@pytest.mark.parametrize("faster", [True, False])
def test_the_compiled_softmax_is_kept_only_where_the_probe_times_it_faster(stock, monkeypatch, faster):
    monkeypatch.setattr(forms, "_seconds", lambda model, cache: 1.0)
    heads = []
    monkeypatch.setattr(softmax, "probe", lambda *h: heads.append(h) or (faster, {"mlx_4": 1.0}))
    chosen = forms.choose(stock.model, stock.model.layers, layout=True)
    attn = stock.model.layers[0].self_attn
    assert heads == [(attn.n_heads, attn.n_kv_heads)]
    assert chosen.compiled_softmax is faster and ("compiled_softmax" in chosen.name) is faster
    weights = [getattr(block._attend, "keywords", {}).get("weights") for block in stock.model.layers]
    assert weights == [softmax.softmax if faster else None] * len(weights)


def test_two_ways_alternate_and_each_counts_its_fastest_run_after_a_warm_up(monkeypatch):
    visits, clock = [], iter([0, 5, 5, 7, 7, 8, 8, 11, 11, 12, 12, 13])  # a 5 s warm-up each, then 2/1, 3/1
    monkeypatch.setattr(alternating.time, "perf_counter", lambda: next(clock))
    best = alternating.fastest(("a", lambda: visits.append("a")), ("b", lambda: visits.append("b")))
    assert visits == ["a", "b", "b", "a", "a", "b"]
    assert best == {"a": 1, "b": 1}


def test_the_softmax_probe_times_both_ways():
    faster, ms = softmax.probe(4, 2)
    assert set(ms) == {f"{way}_{rows}" for way in ("mlx", "compiled") for rows in softmax.PROBE_ROWS}
    assert all(t > 0 for t in ms.values()) and isinstance(faster, bool)


def test_the_activation_probe_times_both_ways():
    faster, ms = activation.probe(64)
    assert set(ms) == {f"{way}_{rows}" for way in ("mlx", "numpy") for rows in activation.PROBE_ROWS}
    assert all(t > 0 for t in ms.values()) and isinstance(faster, bool)


def test_the_long_attention_probe_times_both_ways():
    faster, ms = long_attention.probe(4, 2, 16)
    assert set(ms) == {"mlx", "numpy", "mlx_few", "numpy_few"} and all(t > 0 for t in ms.values())
    wins = [ms["numpy" + s] < (1 - long_attention.MARGIN) * ms["mlx" + s] for s in ("", "_few")]
    near = [abs(ms["numpy" + s] - (1 - long_attention.MARGIN) * ms["mlx" + s]) < 0.01 for s in ("", "_few")]
    assert faster is all(wins) or any(near)  # ms are rounded means: at the bar, either


def test_every_form_gives_the_same_tokens(stock):
    expected = list(generate(stock, Request(PROMPT, 24)))[-1].token_ids
    for f in (Forms(fast_blocks=True), Forms(column_major=True, fast_blocks=True), Forms(column_major=True), Forms()):
        forms.apply(stock.model, stock.model.layers, f)
        assert list(generate(stock, Request(PROMPT, 24)))[-1].token_ids == expected, f
    assert type(stock.model.layers[0]) is llama.TransformerBlock  # back as mlx-lm built it


def test_a_load_runs_the_probe_and_says_what_it_kept(tiny_gguf):
    lm = load(str(tiny_gguf), drafter="random")
    said = describe(lm)
    assert said["speed_paths"] == lm.forms.name and len(said["probe_ms"]) == 17
    ms = said["probe_ms"]
    gap = ms["fast_blocks+column_major"] - (1 - forms.MARGIN) * ms["fast_blocks"]
    rounding = 0.1  # probe_ms are means rounded to 0.1 ms; the choice is made on the exact sums
    assert gap < rounding if lm.forms.column_major else gap > -rounding  # column-major only where it clearly wins
    assert type(lm.model.layers[0]) is fast_block.FastBlock


@pytest.mark.parametrize("faster", [Forms(fast_blocks=True, few_rows=True), Forms(fast_blocks=True)])
def test_few_row_products_are_kept_only_where_the_probe_times_it_faster(stock, monkeypatch, faster):
    current, switched = {}, []
    apply = forms.apply

    def tracked(module, blocks, f):
        apply(module, blocks, f)
        current["forms"] = f

    monkeypatch.setattr(forms, "apply", tracked)
    monkeypatch.setattr(forms.few_rows, "loaded", lambda: True)  # as under the preloaded shim
    monkeypatch.setattr(forms.few_rows, "enable", switched.append)
    monkeypatch.setattr(forms, "_seconds", lambda model, cache: 1.0 if current["forms"] == faster else 2.0)
    monkeypatch.setattr(long_attention, "probe", lambda *shape: (False, {}))
    chosen = forms.choose(stock.model, stock.model.layers, layout=False)
    assert chosen == faster and ("few_rows" in chosen.name) is faster.few_rows
    assert set(chosen.probe_ms) == {"stock", "fast_blocks", "fast_blocks+few_rows"}
    assert switched[-1] is faster.few_rows and False in switched  # `stock` was timed on the BLAS's own sgemm

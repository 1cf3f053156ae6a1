"""A batch's attention in one C call: the same outputs as MLX's per-sequence attention, each row
alone whatever sits beside it, the same caches and the same greedy tokens, and kept only where the
start-up probe times it faster."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from daemon.cpu import fast_block, forms, native_build, ragged_attention
from daemon.cpu.blas import native_folder
from daemon.cpu.forms import Forms

pytestmark = pytest.mark.skipif(native_build._compiler() is None, reason="no C compiler")


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert ragged_attention.load(native_folder())


def filled(kv_heads: int, keys: int, head_dim: int, seed: int) -> KVCache:
    cache = KVCache()
    cache.update_and_fetch(*(mx.random.normal((1, kv_heads, keys, head_dim), key=mx.random.key(seed + i)) for i in (0, 1)))
    return cache


def step(sequences, heads, kv_heads, head_dim, seed=0):
    """(queries [1, H, N, D], new keys and values [1, G, N, D], caches, bounds) of a step whose
    sequences are (rows, keys already cached)."""
    bounds = fast_block.row_bounds(rows for rows, _ in sequences)
    n = bounds[-1][1]
    q = mx.random.normal((1, heads, n, head_dim), key=mx.random.key(seed)) * head_dim ** -0.5
    k, v = (mx.random.normal((1, kv_heads, n, head_dim), key=mx.random.key(seed + i)) for i in (1, 2))
    caches = [filled(kv_heads, keys, head_dim, seed + 10 * i) for i, (_, keys) in enumerate(sequences)]
    return q, k, v, caches, bounds


def by_mlx(q, k, v, caches, bounds):
    outs = []
    for (s, e), cache in zip(bounds, caches):
        kk, vv = cache.update_and_fetch(k[:, :, s:e], v[:, :, s:e])
        outs.append(fast_block.grouped_attention(q[:, :, s:e], kk, vv, 1.0))
    return mx.concatenate(outs, axis=2)


def by_kernel(q, k, v, caches, bounds):
    for (s, e), cache in zip(bounds, caches):
        cache.update_and_fetch(k[:, :, s:e], v[:, :, s:e])
    return ragged_attention.attention(q, caches, bounds)


# (rows, keys cached): one row, a verification, a cache that grows past its 256-key buffer,
# MAX_ROWS rows, a sequence with a single key before its rows
SEQUENCES = [(1, 200), (3, 37), (5, 254), (ragged_attention.MAX_ROWS, 300), (2, 1)]


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 2, 16), (8, 8, 32), (2, 1, 128)])
def test_the_kernel_is_mlxs_attention_per_sequence(heads, kv_heads, head_dim):
    mine = by_kernel(*step(SEQUENCES, heads, kv_heads, head_dim))
    theirs = by_mlx(*step(SEQUENCES, heads, kv_heads, head_dim))
    assert mine.shape == theirs.shape == (1, heads, sum(r for r, _ in SEQUENCES), head_dim)
    np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=1e-4, atol=2e-6)


def test_each_sequences_rows_are_the_same_whatever_sits_beside_them():
    heads, kv_heads, head_dim = 9, 3, 64
    together = np.asarray(by_kernel(*step(SEQUENCES, heads, kv_heads, head_dim)))
    q, k, v, caches, bounds = step(SEQUENCES, heads, kv_heads, head_dim)
    for i, (s, e) in enumerate(bounds):
        alone = by_kernel(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], [filled(kv_heads, SEQUENCES[i][1], head_dim, 10 * i)],
                          [(0, e - s)])
        assert np.array_equal(np.asarray(alone), together[:, :, s:e])


def test_fits_only_head_sizes_and_row_counts_it_computes():
    assert ragged_attention.fits([(0, 1), (1, 17)], 64)
    assert not ragged_attention.fits([(0, 1), (1, 18)], 64)  # 17 rows: a prefill chunk's, MLX's work
    assert not ragged_attention.fits([(0, 1)], 24) and not ragged_attention.fits([(0, 1)], 256)
    assert not ragged_attention.fits([(0, 1)], 96) and not ragged_attention.fits([(0, 1)], 80)  # widths it has no form for


def test_a_blocks_batch_forward_with_the_kernel_matches_mlxs_and_fills_the_same_caches(tiny_lm, monkeypatch):
    layer = tiny_lm.model.model.layers[0]
    attn, hidden = layer.self_attn, tiny_lm.config["hidden_size"]
    sequences = [(1, 30), (4, 9), (2, 70)]
    bounds = fast_block.row_bounds(rows for rows, _ in sequences)
    x = mx.random.normal((1, bounds[-1][1], hidden), key=mx.random.key(3))
    positions = mx.array([keys + j for rows, keys in sequences for j in range(rows)])
    calls, attention = [], ragged_attention.attention
    monkeypatch.setattr(ragged_attention, "attention", lambda *a: calls.append(1) or attention(*a))
    results = {}
    for native in (False, True):
        caches = [filled(attn.n_kv_heads, keys, attn.head_dim, 10 * i) for i, (_, keys) in enumerate(sequences)]
        layer.use_ragged_attention(native)
        try:
            results[native] = layer.ragged(x, positions, bounds, caches), caches
        finally:
            layer.use_ragged_attention(False)
        assert len(calls) == native
    (plain, plain_caches), (mine, my_caches) = results[False], results[True]
    np.testing.assert_allclose(np.asarray(mine), np.asarray(plain), rtol=1e-4, atol=1e-5)
    for a, b in zip(plain_caches, my_caches):
        assert a.offset == b.offset
        assert all(mx.array_equal(x, y).item() for x, y in zip(a.keys_and_values(), b.keys_and_values()))


@pytest.mark.parametrize("rows", [1, ragged_attention.ALONE_ROWS, ragged_attention.ALONE_ROWS + 1])
def test_a_sequences_own_short_forward_takes_the_kernel_and_matches_the_plain_block(tiny_lm, monkeypatch, rows):
    from mlx_lm.models import llama

    layer = tiny_lm.model.model.layers[1]
    hidden = tiny_lm.config["hidden_size"]
    calls, attention = [], ragged_attention.attention
    monkeypatch.setattr(ragged_attention, "attention", lambda *a: calls.append(1) or attention(*a))
    outs = {}
    for native in (False, True):
        cache = filled(layer.self_attn.n_kv_heads, 40, layer.self_attn.head_dim, 5)
        x = mx.random.normal((1, rows, hidden), key=mx.random.key(rows))
        layer.use_ragged_attention(native)
        try:
            outs[native] = (layer(x, cache=cache) if native else llama.TransformerBlock.__call__(layer, x, "causal", cache))
        finally:
            layer.use_ragged_attention(False)
    assert len(calls) == (rows <= ragged_attention.ALONE_ROWS)
    np.testing.assert_allclose(np.asarray(outs[True]), np.asarray(outs[False]), rtol=1e-4, atol=1e-5)


def test_batched_greedy_with_the_kernel_equals_alone(tiny_gguf, monkeypatch):
    from daemon.engine.batch import Batch
    from daemon.engine.generate import generate, sequence
    from daemon.engine.records import Finished, Request
    from daemon.models.loading import load
    from policies.fixed import Fixed

    lm = load(str(tiny_gguf), drafter="random")
    prompts = [tuple((7 * i + 3 * n) % 250 + 1 for i in range(n)) for n in (40, 25, 61)]
    requests = [Request(p, 20) for p in prompts]
    alone = [list(generate(lm, r, Fixed(2)))[-1].token_ids for r in requests]
    forms.apply(lm.model, lm.model.layers, Forms(fast_blocks=True, ragged_attention=True))
    calls, attention = [], ragged_attention.attention
    monkeypatch.setattr(ragged_attention, "attention", lambda *a: calls.append(len(a[1])) or attention(*a))
    done = {}
    batch = Batch(lm.model, lambda owner, r: done.__setitem__(owner, r) if isinstance(r, Finished) else None, 64)
    for i, r in enumerate(requests):
        batch.add(i, sequence(lm, r, Fixed(2), batched=True))
    while batch.running:
        batch.step()
    assert [done[i].token_ids for i in range(3)] == alone
    assert max(calls) == 3 and sum(done[i].stats.drafted for i in range(3)) > 0


def test_the_probe_times_both_ways_and_declines_what_it_cannot_compute():
    faster, ms = ragged_attention.probe(4, 2, 16, fast_block.grouped_attention)
    assert set(ms) == {"mlx", "native"} and all(t > 0 for t in ms.values()) and isinstance(faster, bool)
    assert ragged_attention.probe(4, 2, 24, fast_block.grouped_attention) == (False, {})
    assert ragged_attention.probe(6, 2, 96, fast_block.grouped_attention) == (False, {})


@pytest.mark.parametrize("faster", [True, False])
def test_the_kernel_is_kept_only_where_the_probe_times_it_faster(tiny_gguf, monkeypatch, faster):
    from daemon.models.loading import load

    stock = load(str(tiny_gguf), drafter="none", stock=True)
    monkeypatch.setattr(forms, "_seconds", lambda model, cache: 1.0)
    shapes = []
    monkeypatch.setattr(ragged_attention, "probe", lambda *s: shapes.append(s) or (faster, {"mlx": 2.0, "native": 1.0}))
    chosen = forms.choose(stock.model, stock.model.layers, layout=True)
    attn = stock.model.layers[0].self_attn
    assert shapes == [(attn.n_heads, attn.n_kv_heads, attn.head_dim, fast_block.grouped_attention)]
    assert chosen.ragged_attention is faster and ("ragged_attention" in chosen.name) is faster
    assert chosen.probe_ms["ragged_attention_native"] == 1.0
    assert all(block._ragged_native is faster for block in stock.model.layers)

"""FastBlock: the same block outputs and cache as mlx-lm's llama block, on the short-input path."""

import contextlib

import mlx.core as mx
import pytest
from mlx_lm.models import llama
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from daemon.cpu import activation, long_attention, ragged_attention, softmax
from daemon.cpu.fast_block import (
    MAX_ROWS,
    FastBlock,
    causal_mask,
    fused_attention,
    grouped_attention,
    install,
)

attention = long_attention.attention  # the function itself, for tests that count its calls


@contextlib.contextmanager
def turned_on(use):
    """A FastBlock's other path (`use_long_rows`, `use_numpy_mlp`, `use_compiled_softmax`) on inside, off after."""
    use(True)
    try:
        yield
    finally:
        use(False)


def run_block(call, layer, chunks):
    """Feeds [1, L, H] chunks through one block with a fresh cache; returns outputs and the cache."""
    cache, outs = KVCache(), []
    for x in chunks:
        outs.append(call(layer, x, create_attention_mask(x, cache), cache))
    return outs, cache


@pytest.mark.parametrize("attend", [grouped_attention, fused_attention])
@pytest.mark.parametrize("rows", [1, 2, 5, MAX_ROWS])
def test_outputs_and_cache_match_the_plain_block(tiny_lm, rows, attend, monkeypatch):
    layer = tiny_lm.model.model.layers[1]
    assert type(layer) is FastBlock and layer._attend is grouped_attention  # on a CPU
    monkeypatch.setattr(layer, "_attend", attend)
    hidden = tiny_lm.config["hidden_size"]
    chunks = [mx.random.normal((1, n, hidden), key=mx.random.key(n)) for n in (7, rows, 1, rows)]
    fast, fast_cache = run_block(FastBlock.__call__, layer, chunks)
    plain, plain_cache = run_block(llama.TransformerBlock.__call__, layer, chunks)
    for a, b in zip(fast, plain):
        assert a.shape == b.shape
        assert mx.allclose(a, b, atol=1e-5).item()
    assert fast_cache.offset == plain_cache.offset == 8 + 2 * rows
    for a, b in zip(fast_cache.keys_and_values(), plain_cache.keys_and_values()):
        assert mx.allclose(a, b, atol=1e-5).item()


def test_a_weight_update_after_install_is_used(tiny_lm):
    block = llama.TransformerBlock(llama.ModelArgs.from_dict(tiny_lm.config))
    block.update(tiny_lm.model.model.layers[0].parameters())
    assert install([block, tiny_lm.model.model.layers[0]]) == 1  # the second is a FastBlock already
    x = mx.random.normal((1, 3, tiny_lm.config["hidden_size"]), key=mx.random.key(3))
    before = block(x, "causal", KVCache())
    block.mlp.down_proj.weight = 2 * block.mlp.down_proj.weight
    after = block(x, "causal", KVCache())
    expected = llama.TransformerBlock.__call__(block, x, "causal", KVCache())
    assert not mx.allclose(before, after).item()
    assert mx.allclose(after, expected, atol=1e-5).item()


def test_causal_mask_lets_each_row_see_itself_and_the_past():
    mask = causal_mask(3, 5)
    assert (mask == 0).tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]


# --- long attention in NumPy (daemon.cpu.long_attention) ------------------------------------------

@pytest.mark.parametrize("rows, keys, scale", [(300, 300, 0.25), (40, 1000, 1.0), (1, 9, 0.5), (257, 600, 0.125)])
def test_long_attention_is_grouped_attention(rows, keys, scale):
    q = mx.random.normal((1, 4, rows, 16), key=mx.random.key(1))
    k, v = (mx.random.normal((1, 2, keys, 16), key=mx.random.key(i)) for i in (2, 3))
    expected = grouped_attention(q, k, v, scale)
    got = long_attention.attention(q, k, v, scale)
    assert got.shape == expected.shape and mx.allclose(got, expected, atol=2e-5).item()


def test_long_chunks_and_long_few_row_steps_take_the_numpy_path_and_match_the_plain_block(tiny_lm, monkeypatch):
    layer = tiny_lm.model.model.layers[0]
    calls = []
    monkeypatch.setattr(long_attention, "LONG_SCORES", 2000)
    monkeypatch.setattr(long_attention, "attention", lambda *a: calls.append(a[0].shape) or attention(*a))
    hidden = tiny_lm.config["hidden_size"]
    chunks = [mx.random.normal((1, n, hidden), key=mx.random.key(n)) for n in (40, 30, 1, 8)]
    with turned_on(layer.use_long_rows):
        fast, fast_cache = run_block(FastBlock.__call__, layer, chunks)
    plain, plain_cache = run_block(llama.TransformerBlock.__call__, layer, chunks)
    heads = layer.self_attn.n_heads
    assert heads * 71 < 2000 <= heads * 8 * 79  # the 1-row step's scores are too few, the 8-row step's enough
    assert calls == [(1, heads, n, layer.self_attn.head_dim) for n in (40, 30, 8)]
    for a, b in zip(fast, plain):
        assert mx.allclose(a, b, atol=1e-5).item()
    assert mx.allclose(fast_cache.state[0], plain_cache.state[0]).item() and fast_cache.offset == 79


def test_many_rows_take_the_numpy_activation_and_match_the_plain_block(tiny_lm, monkeypatch):
    layer = tiny_lm.model.model.layers[0]
    swiglu, calls = activation.swiglu, []
    monkeypatch.setattr(activation, "swiglu", lambda g, u: calls.append(g.shape[1]) or swiglu(g, u))
    hidden = tiny_lm.config["hidden_size"]
    chunks = [mx.random.normal((1, n, hidden), key=mx.random.key(n)) for n in (40, activation.ROWS, 1, 12, 3)]
    with turned_on(layer.use_numpy_mlp):
        fast, _ = run_block(FastBlock.__call__, layer, chunks)
    plain, _ = run_block(llama.TransformerBlock.__call__, layer, chunks)
    assert calls == [40, activation.ROWS, 12]  # the plain path's chunk, the short path's; not 1 or 3 rows
    for a, b in zip(fast, plain):
        assert mx.allclose(a, b, atol=1e-5).item()


def test_softmax_with_a_compiled_exp_is_mlx_softmax():
    scores = mx.random.normal((1, 3, 15, 301), key=mx.random.key(0)) * 5
    scores = mx.where(mx.random.uniform(shape=scores.shape, key=mx.random.key(1)) < 0.2, -mx.inf, scores)
    assert mx.allclose(softmax.softmax(scores), mx.softmax(scores, axis=-1, precise=True), atol=1e-6).item()


def test_verifications_take_the_compiled_softmax_and_match_the_plain_block(tiny_lm, monkeypatch):
    layer = tiny_lm.model.model.layers[0]
    calls = []
    monkeypatch.setattr(softmax, "softmax", lambda x: calls.append(x.shape[2]) or mx.softmax(x, axis=-1, precise=True))
    monkeypatch.setattr(ragged_attention, "fits", lambda *a: False)  # MLX's attention, wherever the probe put the C one
    heads = layer.self_attn.n_heads // layer.self_attn.n_kv_heads
    hidden = tiny_lm.config["hidden_size"]
    chunks = [mx.random.normal((1, n, hidden), key=mx.random.key(n)) for n in (7, 1, softmax.ROWS - 1, softmax.ROWS, 9)]
    with turned_on(layer.use_compiled_softmax):
        fast, _ = run_block(FastBlock.__call__, layer, chunks)
    assert layer._attend is grouped_attention  # off again after
    plain, _ = run_block(llama.TransformerBlock.__call__, layer, chunks)
    assert calls == [heads * n for n in (7, softmax.ROWS, 9)]  # from ROWS rows on
    for a, b in zip(fast, plain):
        assert mx.allclose(a, b, atol=1e-5).item()


@pytest.mark.parametrize("form", ["long_attention", "numpy_mlp"])
def test_batched_prefill_with_numpy_paths_gives_the_same_tokens(tiny_gguf, monkeypatch, form):
    from daemon.cpu.forms import Forms, apply
    from daemon.engine.batch import Batch
    from daemon.engine.generate import generate, sequence
    from daemon.engine.records import Finished, Request
    from daemon.models.loading import load
    from policies.fixed import Fixed

    lm = load(str(tiny_gguf), drafter="none")
    prompts = [tuple((7 * i + 3) % 250 + 1 for i in range(n)) for n in (90, 60)]
    alone = [list(generate(lm, Request(p, 16), Fixed(0)))[-1].token_ids for p in prompts]
    monkeypatch.setattr(long_attention, "LONG_SCORES", 500)
    apply(lm.model, lm.model.layers, Forms(fast_blocks=True, **{form: True}))
    calls, swiglu = [], activation.swiglu
    monkeypatch.setattr(long_attention, "attention", lambda *a: calls.append(1) or attention(*a))
    monkeypatch.setattr(activation, "swiglu", lambda g, u: calls.append(2) or swiglu(g, u))
    done = {}
    batch = Batch(lm.model, lambda owner, r: done.__setitem__(owner, r) if isinstance(r, Finished) else None, 64)
    for i, p in enumerate(prompts):
        batch.add(i, sequence(lm, Request(p, 16), Fixed(0), chunk=lambda: 32, batched=True))
    while batch.running:
        batch.step()
    assert {1: "long_attention", 2: "numpy_mlp"}[calls[0]] == form and set(calls) == {calls[0]}
    assert [done[i].token_ids for i in range(2)] == alone

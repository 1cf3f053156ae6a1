"""Row-major copies for few-row inputs: same outputs as the plain block and head, used only for
inputs of up to FEW_ROWS rows, made only under MKL, and speculation stays lossless with them."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import llama
from mlx_lm.models.cache import KVCache

from daemon.cpu import row_major
from daemon.cpu.fast_block import FEW_ROWS, FastBlock
from daemon.cpu.layout import column_major
from daemon.engine.generate import generate
from daemon.engine.records import Request
from daemon.models.loading import load
from daemon.models.target import target_head_layer
from policies.fixed import Fixed

PROMPT = (1, 80, 120, 7, 200, 33, 150)


@pytest.fixture
def copied_lm(tiny_gguf):
    """A fresh tiny model (the session's tiny_lm stays without copies) with row-major copies."""
    lm = load(str(tiny_gguf), drafter="random")
    assert row_major.install(lm.model.model.layers, target_head_layer(lm.model)) == len(lm.model.model.layers)
    assert row_major.install([lm.drafter.block]) == 1
    return lm


def test_in_process_tests_run_without_copies(tiny_lm):
    """pytest itself runs on MLX's reference BLAS: load() makes no copies there."""
    assert row_major.copies(tiny_lm.model.model.layers) == 0
    assert not row_major.worth_it(tiny_lm.model)


def test_worth_it_under_mkl_for_fp32_weights(tiny_lm, monkeypatch):
    monkeypatch.setattr("daemon.cpu.blas.blas_in_use", lambda: "Intel MKL (/x/libmkl_rt.so.3)")
    assert row_major.worth_it(tiny_lm.model)
    monkeypatch.setattr(row_major, "MEMORY_SHARE", 10**12)  # as if the weights were huge
    assert not row_major.worth_it(tiny_lm.model)


@pytest.mark.parametrize("rows", range(1, FEW_ROWS + 3))
def test_block_matches_the_plain_block_and_uses_copies_for_few_rows(copied_lm, rows, monkeypatch):
    layer = copied_lm.model.model.layers[1]
    hidden = copied_lm.config["hidden_size"]
    x = mx.random.normal((1, rows, hidden), key=mx.random.key(rows))
    calls = []
    pre_few = layer._pre_few
    monkeypatch.setattr(layer, "_pre_few", lambda *a: calls.append(1) or pre_few(*a))
    fast_cache, plain_cache = KVCache(), KVCache()
    for cache in (fast_cache, plain_cache):  # 5 rows of context first
        llama.TransformerBlock.__call__(layer, mx.random.normal((1, 5, hidden), key=mx.random.key(0)), "causal", cache)
    fast = FastBlock.__call__(layer, x, None, fast_cache)
    plain = llama.TransformerBlock.__call__(layer, x, "causal" if rows > 1 else None, plain_cache)
    assert bool(calls) == (rows <= FEW_ROWS)
    assert mx.allclose(fast, plain, atol=1e-5).item()
    for a, b in zip(fast_cache.keys_and_values(), plain_cache.keys_and_values()):
        assert mx.allclose(a, b, atol=1e-5).item()


@pytest.mark.parametrize("rows", [1, FEW_ROWS, FEW_ROWS + 1])
@pytest.mark.parametrize("kind", ["lm_head", "tied embedding"])
def test_head_matches_the_column_major_head(rows, kind):
    layer = nn.Linear(64, 300, bias=False) if kind == "lm_head" else nn.Embedding(300, 64)
    column_major(layer)
    as_head = layer if kind == "lm_head" else layer.as_linear
    x = mx.random.normal((1, rows, 64), key=mx.random.key(rows))
    expected, looked_up = as_head(x), layer(mx.array([[3, 4]])) if kind != "lm_head" else None
    row_major.install([], layer)
    assert type(layer) is (row_major.RowMajorLinear if kind == "lm_head" else row_major.RowMajorEmbedding)
    as_head = layer if kind == "lm_head" else layer.as_linear
    assert mx.allclose(as_head(x), expected, atol=1e-5).item()
    if kind != "lm_head":  # still an embedding
        assert mx.array_equal(layer(mx.array([[3, 4]])), looked_up).item()


def test_blocks_with_biases_get_no_copies(tiny_lm):
    args = llama.ModelArgs.from_dict({**tiny_lm.config, "attention_bias": True})
    block = llama.TransformerBlock(args)
    block.__class__ = FastBlock
    block._compile()
    assert not block.add_row_major() and row_major.copies([block]) == 0


@pytest.mark.parametrize("k", [1, 2, 5])
def test_speculation_with_copies_gives_plain_output(copied_lm, tiny_lm, k):
    plain = list(generate(tiny_lm, Request(PROMPT, max_tokens=60), Fixed(0)))[-1].token_ids
    done = list(generate(copied_lm, Request(PROMPT, max_tokens=60), Fixed(k)))[-1]
    assert done.token_ids == plain and done.stats.drafted > 0
    off = list(generate(copied_lm, Request(PROMPT, max_tokens=60), Fixed(0)))[-1]
    assert off.token_ids == plain

"""FastBlock: the same block outputs and cache as mlx-lm's llama block, on the short-input path."""

import mlx.core as mx
import pytest
from mlx_lm.models import llama
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from daemon.cpu.fast_block import (
    MAX_ROWS,
    FastBlock,
    causal_mask,
    fused_attention,
    grouped_attention,
    install,
)


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

"""The greedy token and its top-2 margin, the near-tie guard's input."""

import mlx.core as mx
import numpy as np

from daemon.engine.ties import greedy_with_margin


def test_argmax_and_margin_equal_a_sort_per_row():
    logits = mx.random.normal((5, 1000), key=mx.random.key(1))
    best, margin = greedy_with_margin(logits)
    rows = np.sort(np.array(logits), axis=-1)
    assert best.tolist() == np.argmax(np.array(logits), axis=-1).tolist()
    assert margin.tolist() == (rows[:, -1] - rows[:, -2]).tolist()


def test_an_exact_tie_has_margin_zero_and_takes_the_first():
    logits = mx.array([[0.5, 2.0, -1.0, 2.0], [3.0, 1.0, 1.0, 2.5]])
    best, margin = greedy_with_margin(logits)
    assert best.tolist() == [1, 0]
    assert margin.tolist() == [0.0, 0.5]


def test_one_row_without_a_batch_axis_and_half_precision():
    best, margin = greedy_with_margin(mx.array([1.0, 4.0, 3.0], mx.float16))
    assert best.item() == 1 and margin.item() == 1.0 and margin.dtype == mx.float32


def test_a_recomputation_reuses_the_whole_chunks_it_kept_and_equals_a_fresh_prefill(tiny_lm, monkeypatch):
    from mlx_lm.models.cache import make_prompt_cache

    import daemon.engine.ties as ties
    from daemon.engine.forward import PREFILL_CHUNK, prefill

    ran = []
    extend = ties.extend_rows
    monkeypatch.setattr(ties, "extend_rows", lambda cache, ids: ran.append(len(ids)) or extend(cache, ids))
    guard = ties.NearTieGuard(tiny_lm.model, margin=1.0)
    text = [(13 * i + 5) % 250 + 1 for i in range(2 * PREFILL_CHUNK + 100)]
    changed = text[:1100]
    changed[PREFILL_CHUNK + 10] = 7  # a token in the second chunk differs: the first chunk is kept
    for seq, runs in ((text[:600], PREFILL_CHUNK), (text, PREFILL_CHUNK), (changed, PREFILL_CHUNK),
                      (text[: PREFILL_CHUNK + 1], 0), (text[:40], 0)):
        expected = prefill(tiny_lm.model, make_prompt_cache(tiny_lm.model), seq)
        got = guard._canonical(seq)
        assert mx.array_equal(got, expected).item(), len(seq)
        assert ran.pop() == runs  # only the whole chunks it did not hold
        assert guard._cache[0].offset == len(guard._ids) == (len(seq) - 1) // PREFILL_CHUNK * PREFILL_CHUNK

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

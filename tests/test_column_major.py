"""column_major: same shapes and values, bit-identical model outputs."""

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from daemon.cpu.layout import column_major
from daemon.models.loading import load


def test_column_major_keeps_shapes_values_and_outputs(tiny_gguf):
    lm = load(str(tiny_gguf), drafter="none")
    lm.model.update(tree_map(mx.contiguous, lm.model.parameters()))  # back to row-major
    before = dict(tree_flatten(lm.model.parameters()))
    ids = mx.array([[5, 80, 120, 7, 33]])
    expected = lm.model(ids)
    column_major(lm.model)
    after = dict(tree_flatten(lm.model.parameters()))
    assert before.keys() == after.keys()
    for name, w in before.items():
        assert after[name].shape == w.shape and mx.array_equal(after[name], w).item(), name
    assert mx.array_equal(lm.model(ids), expected).item()

"""The faster forms of a forward, kept only where they win on this machine.

mtpd's speed paths were each measured faster somewhere and are slower elsewhere: on a 2-vCPU AMD
EPYC VM with OpenBLAS the column-major fp32 layout made a one-row forward of the default model 30%
longer than mlx-lm's own (61.7 -> 80.2 ms) while FastBlocks made it 12% shorter (54.3 ms). So at load
the layouts are timed on this machine, with FastBlocks and without, beside the forward mlx-lm runs
(`stock`): one new row and three (a decode step, a common verification) after a CONTEXT-token
prompt, visiting the forms in the order A B C C B A so drift cancels (about 4 s for the default
model on 2 cores; `stock` with the BLAS's own sgemm for every product). Column-major weights, and
few-row products by daemon.cpu.few_rows's shim where it is loaded, are kept only where they are
MARGIN faster, so a restart makes the same choice. FastBlocks stay whatever their time alone: the
batch's one forward over several sequences runs through them (daemon.engine.ragged); the probe
says how they compare with `stock`. The choice and the timings go in the `model loaded` log line
and /health (`speed_paths`). On a CPU, long prompts' attention in NumPy is timed against MLX's
on one prefill-sized attention and kept only where it wins (daemon.cpu.long_attention); so is the
MLP's activation in NumPy for many rows (daemon.cpu.activation), attention's softmax with a
compiled exp (daemon.cpu.softmax), and a batch's attention in one C call (daemon.cpu.ragged_attention).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from daemon.cpu import activation, fast_block, few_rows, long_attention, ragged_attention, softmax
from daemon.cpu.layout import column_major

PROBE_ROWS = (1, 3)
CONTEXT = 128
REPEATS = 2  # timed forwards per row count and visit (the fastest counts)
MARGIN = 0.05  # column-major weights are kept only if this much faster


@dataclass(frozen=True)
class Forms:
    """Which faster forms a model runs, and what the probe measured (ms per 1 + 3-row forward pair)."""

    column_major: bool = False
    fast_blocks: bool = False
    long_attention: bool = False  # long prompts' attention in NumPy (daemon.cpu.long_attention)
    numpy_mlp: bool = False  # the MLP's activation in NumPy for many rows (daemon.cpu.activation)
    few_rows: bool = False  # few-row products by daemon.cpu.few_rows's shim
    compiled_softmax: bool = False  # attention's softmax with a compiled exp (daemon.cpu.softmax)
    ragged_attention: bool = False  # a batch's attention in one C call (daemon.cpu.ragged_attention)
    probe_ms: dict[str, float] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def unprobed(cls, gpu: bool, fast_blocks: bool = True) -> Forms:
        """Where no forward can be timed (a cluster rank's part of a model): every form the backend has."""
        return cls(column_major=not gpu, fast_blocks=fast_blocks, few_rows=not gpu and few_rows.loaded())

    @property
    def name(self) -> str:
        on = (("fast_blocks", self.fast_blocks), ("column_major", self.column_major), ("few_rows", self.few_rows),
              ("numpy_attention", self.long_attention), ("numpy_mlp", self.numpy_mlp),
              ("compiled_softmax", self.compiled_softmax), ("ragged_attention", self.ragged_attention))
        return "+".join(n for n, yes in on if yes) or "stock"


def _fast(blocks: list, on: bool) -> None:
    if not on:
        for block in blocks:
            if type(block) is fast_block.FastBlock:
                block.__class__ = fast_block.llama.TransformerBlock
    elif any(hasattr(block, "_pre") for block in blocks):  # compiled on an earlier visit: kept
        for block in blocks:
            block.__class__ = fast_block.FastBlock
    else:
        fast_block.install(blocks)


def _row_major(module: nn.Module) -> None:
    """Back to mlx-lm's layout: every fp32 matrix contiguous row by row."""
    module.update(tree_map(lambda w: mx.contiguous(w) if w.ndim == 2 and w.dtype == mx.float32 else w, module.parameters()))
    mx.eval(module.parameters())


def apply(module: nn.Module, blocks: list, forms: Forms) -> None:
    """Puts `module` (loaded as mlx-lm loads it, or as a probe left it) in `forms`."""
    (column_major if forms.column_major else _row_major)(module)
    _fast(blocks, forms.fast_blocks)
    few_rows.enable(forms.few_rows)
    for block in blocks:
        if type(block) is fast_block.FastBlock:
            block.use_long_rows(forms.long_attention)
            block.use_numpy_mlp(forms.numpy_mlp)
            block.use_compiled_softmax(forms.compiled_softmax)
            block.use_ragged_attention(forms.ragged_attention)


def _seconds(model: nn.Module, cache: list) -> float:
    """A forward of 1 and of 3 new rows after the context in `cache`, each the fastest of REPEATS
    after one that warms up (traces, first touches)."""
    total = 0.0
    for rows in PROBE_ROWS:
        runs = []
        for _ in range(REPEATS + 1):
            start = time.perf_counter()
            mx.eval(model(mx.array([list(range(5, 5 + rows))]), cache=cache))
            runs.append(time.perf_counter() - start)
            trim_prompt_cache(cache, rows)
        total += min(runs[1:])
    return total


def choose(model: nn.Module, blocks: list, layout: bool) -> Forms:
    """Times the forms on `model` (as mlx-lm loads it) and leaves it in the fastest. `layout`: the
    column-major layout is a candidate (fp32 weights on a CPU); so are few-row products by
    daemon.cpu.few_rows's shim where it is loaded, timed against the same forms without it."""
    candidates = [Forms(column_major=c, fast_blocks=True, few_rows=f)
                  for c in ((False, True) if layout else (False,)) for f in ((False, True) if few_rows.loaded() else (False,))]
    timed = [Forms(), *candidates]  # mlx-lm's own forward, for the record
    cache = make_prompt_cache(model)  # one context for every form: they compute the same
    mx.eval(model(mx.array([list(range(1, CONTEXT + 1))]), cache=cache))
    times: dict[Forms, list[float]] = {f: [] for f in timed}
    for forms in timed + timed[::-1]:
        apply(model, blocks, forms)
        times[forms].append(_seconds(model, cache))
    best = candidates[0]  # mlx-lm's layout and sgemm, unless another is clearly faster: the choice holds across restarts
    for f in candidates[1:]:
        if sum(times[f]) < (1 - MARGIN) * sum(times[best]):
            best = f
    probe_ms = {f.name: round(sum(times[f]) / len(times[f]) * 1000, 1) for f in timed}
    longer = numpy_mlp = compiled_softmax = ragged = False
    llama_blocks = [b for b in blocks if isinstance(b, fast_block.llama.TransformerBlock)]  # what FastBlocks become
    if layout and llama_blocks:  # a CPU: MLX's softmax is scalar there
        attn = llama_blocks[0].self_attn
        longer, ms = long_attention.probe(attn.n_heads, attn.n_kv_heads, attn.head_dim)
        probe_ms.update({f"long_attention_{name}": t for name, t in ms.items()})
        numpy_mlp, ms = activation.probe(llama_blocks[0].mlp.gate_proj.weight.shape[0])
        probe_ms.update({f"activation_{name}": t for name, t in ms.items()})
        compiled_softmax, ms = softmax.probe(attn.n_heads, attn.n_kv_heads)
        probe_ms.update({f"softmax_{name}": t for name, t in ms.items()})
        ragged, ms = ragged_attention.probe(attn.n_heads, attn.n_kv_heads, attn.head_dim, fast_block.grouped_attention)
        probe_ms.update({f"ragged_attention_{name}": t for name, t in ms.items()})
    chosen = Forms(column_major=best.column_major, fast_blocks=best.fast_blocks, long_attention=longer, numpy_mlp=numpy_mlp,
                   few_rows=best.few_rows, compiled_softmax=compiled_softmax, ragged_attention=ragged, probe_ms=probe_ms)
    apply(model, blocks, chosen)
    return chosen

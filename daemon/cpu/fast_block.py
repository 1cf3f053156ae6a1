"""Llama decoder blocks for short inputs: compiled halves around the KV cache, lean attention.

A decode step or a verification of a few rows is bound by per-op overhead as much as by the
weights: each of the ~20 ops of a block costs Python graph building and a dispatch. The parts before
and after the KV cache (norm, projections, RoPE at an array offset; output projection, residuals,
MLP) run as compiled graphs, replayed from C++ with the elementwise ops fused: bit-identical to the
plain block. On a CPU, attention folds the query heads that share a KV head into the rows of one
matmul (a third of the BLAS calls of MLX's fallback for grouped heads) with a precomputed causal
mask; it sums in another order, so its logits differ from the plain block's by ~1e-5 (daemon.engine.ties
keeps greedy output independent of that). On Metal, MLX's fused attention kernel stays.

Each distinct row count is traced once per block, so only inputs of up to `MAX_ROWS` rows take
this path (prefill chunks go the plain way). Weights are read live at every call (`inputs=`), so a
later weight update is never ignored.

`add_row_major` gives a block a second, row-major copy of its matrices for inputs of up to
`FEW_ROWS` rows, with the q/k/v and the gate/up projections each fused into one matrix (fewer BLAS
calls); daemon.cpu.row_major says when and why.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.models.activations import swiglu
from mlx_lm.models.cache import KVCache

from daemon.cpu import activation, long_attention, ragged_attention, softmax
from daemon.cpu.long_attention import long_enough

MAX_ROWS = 16
FEW_ROWS = 3  # inputs of up to this many rows use the row-major copies, where a block has them


def row_bounds(lengths) -> list[tuple[int, int]]:
    """Each sequence's (start, end) in rows laid end to end, for `FastBlock.ragged`."""
    bounds, end = [], 0
    for n in lengths:
        bounds.append((end, end + n))
        end += n
    return bounds


class FastBlock(llama.TransformerBlock):
    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        # batched caches, feature extraction, prefill chunks and array masks take the plain way
        if type(cache) is not KVCache or x.shape[1] > MAX_ROWS or isinstance(mask, mx.array):
            if self._long_rows and type(cache) is KVCache and not isinstance(mask, mx.array) and long_enough(
                    x.shape[1], cache.offset + x.shape[1], self.self_attn.n_heads):
                return self._long(x, cache)
            h = x + self.self_attn(self.input_layernorm(x), mask, cache)  # mlx-lm's block
            return h + self._mlp(self.post_attention_layernorm(h))
        few = self._few(x)
        offset = mx.array(cache.offset)
        queries, keys, values = self._pre(x, offset) if few is None else self._pre_few(x, offset, few[0])
        keys, values = cache.update_and_fetch(keys, values)
        if self._ragged_native and x.shape[1] <= ragged_attention.ALONE_ROWS and ragged_attention.fits(
                [(0, x.shape[1])], self.self_attn.head_dim):
            out = ragged_attention.attention(queries, [cache], [(0, x.shape[1])], self.self_attn.scale)
        else:
            long = self._long_rows and long_enough(x.shape[1], keys.shape[2], self.self_attn.n_heads)
            out = (long_attention.attention if long else self._attend)(queries, keys, values, self.self_attn.scale)
        return self._post_rows(x, out) if few is None else self._post_few(x, out, *few[1:])

    def ragged(self, x: mx.array, positions: mx.array, bounds, caches) -> mx.array:
        """The rows of several sequences, laid end to end in x [1, N, H] (daemon.engine.ragged):
        `positions` [N] each row's position in its sequence; `bounds` each sequence's (start, end)
        in the rows; `caches` each one's KV cache. Attention runs per sequence, the rest over all."""
        few = self._few(x)
        queries, keys, values = self._pre_rows(x, positions) if few is None else self._pre_rows_few(x, positions, few[0])
        native = self._ragged_native and ragged_attention.fits(bounds, self.self_attn.head_dim)
        outs = []
        for (s, e), cache in zip(bounds, caches):  # queries come scaled
            k, v = cache.update_and_fetch(keys[:, :, s:e], values[:, :, s:e])
            if not native:
                long = self._long_rows and long_enough(e - s, k.shape[2], self.self_attn.n_heads)
                outs.append((long_attention.attention if long else self._attend)(queries[:, :, s:e], k, v, 1.0))
        if native:
            out = ragged_attention.attention(queries, caches, bounds)
        else:
            out = mx.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
        return self._post_rows(x, out) if few is None else self._post_few(x, out, *few[1:])

    def _long(self, x: mx.array, cache: KVCache) -> mx.array:
        """mlx-lm's block, with long attention's scores in NumPy (daemon.cpu.long_attention)."""
        attn = self.self_attn
        B, L, _ = x.shape
        h = self.input_layernorm(x)
        q, k, v = (proj(h).reshape(B, L, n, -1).transpose(0, 2, 1, 3) for proj, n in (
            (attn.q_proj, attn.n_heads), (attn.k_proj, attn.n_kv_heads), (attn.v_proj, attn.n_kv_heads)))
        q, k = attn.rope(q, offset=cache.offset), attn.rope(k, offset=cache.offset)
        k, v = cache.update_and_fetch(k, v)
        out = long_attention.attention(q, k, v, attn.scale)
        h = x + attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))
        return h + self._mlp(self.post_attention_layernorm(h))

    def _many(self, rows: int) -> bool:
        return self._numpy_mlp and rows >= activation.ROWS

    def _mlp(self, h: mx.array) -> mx.array:
        """mlx-lm's MLP, its activation in NumPy for many rows (daemon.cpu.activation)."""
        mlp = self.mlp
        if self._many(h.shape[0] * h.shape[1]):
            return mlp.down_proj(activation.swiglu(mlp.gate_proj(h), mlp.up_proj(h)))
        return mlp(h)

    def _post_rows(self, x: mx.array, out: mx.array) -> mx.array:
        if self._many(x.shape[1]):
            h, gate, up = self._post_gates(x, out)
            return self._post_down(h, activation.swiglu(gate, up))
        return self._post(x, out)

    def use_long_rows(self, on: bool) -> None:
        """Long attention in NumPy where the probe found it faster (daemon.cpu.forms)."""
        object.__setattr__(self, "_long_rows", on)

    def use_numpy_mlp(self, on: bool) -> None:
        """The MLP's activation in NumPy for many rows where the probe found it faster (daemon.cpu.forms)."""
        object.__setattr__(self, "_numpy_mlp", on)

    def use_ragged_attention(self, on: bool) -> None:
        """A batch's attention in one C call where the probe found it faster (daemon.cpu.ragged_attention)."""
        object.__setattr__(self, "_ragged_native", on)

    def use_compiled_softmax(self, on: bool) -> None:
        """Attention's softmax with a compiled exp where the probe found it faster (daemon.cpu.softmax)."""
        if self._attend is not fused_attention:
            object.__setattr__(self, "_attend", functools.partial(grouped_attention, weights=softmax.softmax) if on
                               else grouped_attention)

    def _few(self, x: mx.array):
        return self._row_major if x.shape[1] <= FEW_ROWS else None

    def _compile(self) -> None:
        attn = self.self_attn

        q_width = attn.n_heads * attn.head_dim
        kv_width = attn.n_kv_heads * attn.head_dim

        def heads(q, k, v, offset):
            B, L, _ = q.shape
            q = q.reshape(B, L, attn.n_heads, -1).transpose(0, 2, 1, 3)
            k = k.reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
            v = v.reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
            return attn.rope(q, offset=offset), attn.rope(k, offset=offset), v

        def merged(out):
            B, _, L, _ = out.shape
            return out.transpose(0, 2, 1, 3).reshape(B, L, -1)

        def pre(x, offset):
            h = self.input_layernorm(x)
            return heads(attn.q_proj(h), attn.k_proj(h), attn.v_proj(h), offset)

        def post(x, out):
            h = x + attn.o_proj(merged(out))
            return h + self.mlp(self.post_attention_layernorm(h))

        def post_gates(x, out):  # post up to the MLP's activation
            h = x + attn.o_proj(merged(out))
            n = self.post_attention_layernorm(h)
            return h, self.mlp.gate_proj(n), self.mlp.up_proj(n)

        def post_down(h, act):
            return h + self.mlp.down_proj(act)

        def pre_few(x, offset, w_qkv):
            q, k, v = mx.split(self.input_layernorm(x) @ w_qkv.T, [q_width, q_width + kv_width], axis=-1)
            return heads(q, k, v, offset)

        def post_few(x, out, w_o, w_gate_up, w_down):
            h = x + merged(out) @ w_o.T
            gate, up = mx.split(self.post_attention_layernorm(h) @ w_gate_up.T, 2, axis=-1)
            return h + swiglu(gate, up) @ w_down.T

        def rows(q, k, v, positions):  # [1, N, heads * D] -> [1, heads, N, D], each row at its position
            N = q.shape[1]
            q = q.reshape(N, attn.n_heads, 1, -1)
            k, v = k.reshape(N, attn.n_kv_heads, 1, -1), v.reshape(N, attn.n_kv_heads, 1, -1)
            q, k = attn.rope(q, offset=positions) * attn.scale, attn.rope(k, offset=positions)
            return q.swapaxes(0, 2), k.swapaxes(0, 2), v.swapaxes(0, 2)

        def pre_rows(x, positions):
            h = self.input_layernorm(x)
            return rows(attn.q_proj(h), attn.k_proj(h), attn.v_proj(h), positions)

        def pre_rows_few(x, positions, w_qkv):
            return rows(*mx.split(self.input_layernorm(x) @ w_qkv.T, [q_width, q_width + kv_width], axis=-1), positions)

        object.__setattr__(self, "_pre_rows", mx.compile(pre_rows, inputs=self.state))
        object.__setattr__(self, "_pre_rows_few", mx.compile(pre_rows_few, inputs=self.state))
        object.__setattr__(self, "_pre", mx.compile(pre, inputs=self.state))
        object.__setattr__(self, "_post", mx.compile(post, inputs=self.state))
        object.__setattr__(self, "_post_gates", mx.compile(post_gates, inputs=self.state))
        object.__setattr__(self, "_post_down", mx.compile(post_down, inputs=self.state))
        object.__setattr__(self, "_pre_few", mx.compile(pre_few, inputs=self.state))
        object.__setattr__(self, "_post_few", mx.compile(post_few, inputs=self.state))
        object.__setattr__(self, "_attend", grouped_attention if mx.default_device() == mx.cpu else fused_attention)
        object.__setattr__(self, "_row_major", None)  # (qkv, o, gate_up, down) from add_row_major
        object.__setattr__(self, "_long_rows", False)  # long attention in NumPy (use_long_rows)
        object.__setattr__(self, "_numpy_mlp", False)  # the activation in NumPy for many rows (use_numpy_mlp)
        object.__setattr__(self, "_ragged_native", False)  # a batch's attention in C (use_ragged_attention)

    COMPILED = ("_pre_rows", "_pre_rows_few", "_pre", "_post", "_post_gates", "_post_down", "_pre_few", "_post_few")

    def release(self) -> None:
        """Drops the compiled forms: they hold the block (`inputs=self.state`) inside MLX, where
        Python's collector cannot see the cycle, so an unloaded model would stay in memory."""
        for name in self.COMPILED:
            object.__setattr__(self, name, None)

    def add_row_major(self) -> bool:
        """Row-major copies of the block's fp32 matrices for inputs of up to FEW_ROWS rows (a
        snapshot of the current weights). False, and nothing copied, where the block has biases
        or other than fp32 matrices."""
        attn, mlp = self.self_attn, self.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any("bias" in m or type(m) is not nn.Linear or m.weight.dtype != mx.float32 for m in linears):
            return False
        q, k, v, o, gate, up, down = (m.weight for m in linears)
        copies = (mx.concatenate([q, k, v]), mx.contiguous(o), mx.concatenate([gate, up]), mx.contiguous(down))
        mx.eval(copies)
        object.__setattr__(self, "_row_major", copies)
        return True


@functools.lru_cache(maxsize=4)  # every block of one forward asks for the same mask
def causal_mask(rows: int, keys: int) -> mx.array:
    """[rows, keys] additive mask: row i (the (keys - rows + i)-th position) sees keys up to itself."""
    return mx.where(mx.arange(keys)[None] <= (keys - rows + mx.arange(rows))[:, None], 0.0, -mx.inf)


def grouped_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, weights=softmax.mlx_softmax) -> mx.array:
    """Causal attention of the last L positions. q [B, H, L, D]; k, v [B, G, S, D] with H a
    multiple of G. Returns [B, H, L, D]. `weights`: the softmax over the keys from softmax.ROWS rows."""
    B, H, L, D = q.shape
    G, S = k.shape[1], k.shape[2]
    scores = (q * scale if scale != 1.0 else q).reshape(B, G, H // G * L, D) @ k.swapaxes(-1, -2)
    if L > 1:
        scores = (scores.reshape(B, G, H // G, L, S) + causal_mask(L, S)).reshape(B, G, H // G * L, S)
    return ((weights if L >= softmax.ROWS else softmax.mlx_softmax)(scores) @ v).reshape(B, H, L, D)


def fused_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """MLX's fused kernel (Metal has one; on a CPU it falls back to separate ops)."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if q.shape[2] > 1 else None)


def install(layers: list[nn.Module]) -> int:
    """Turns the plain llama blocks among `layers` into FastBlocks in place (same parameters).
    Returns how many were turned; other families are left as they are."""
    turned = 0
    for layer in layers:
        if type(layer) is llama.TransformerBlock:
            layer.__class__ = FastBlock
            layer._compile()
            turned += 1
    return turned

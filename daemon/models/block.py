"""Block drafters: one drafter forward proposes a whole block (z-lab's DFlash, DeepSeek's DSpark).

The drafter reads the target's hidden states at several of its layers (`target_layer_ids`: block
outputs, -1 the embedding's), concatenated and fused into one context row per position:
    c_i = hidden_norm(fc([h_i^(l1); h_i^(l2); ...]))
Every layer turns the context rows into keys and values of its own (k_norm(k_proj(c)), v_proj(c),
RoPE at their positions) and keeps them in its cache, appended as the target accepts tokens. A
round runs the block [t, mask x (B - 1)] (t: the last token, not yet in the target's cache, at
position p = the context's length) through Qwen3-style layers: queries, keys and values of the
block rows (after input_layernorm) beside the cached context's, attention over context and block
without a causal mask; the block's own keys never enter the cache. Then norm, and the head:
  DFlash (z-lab/dflash, dflash/model_mlx.py: DFlashAttention, DFlashDraftModel, stream_generate):
    the target's embedding and head; rows 1..B-1 give the tokens at their own positions
    p+1 .. p+B-1 (B - 1 proposals);
  DSpark (deepseek-ai/DeepSpec, deepspec/modeling/dspark/qwen3/modeling.py, markov_head.py,
    eval/dspark/draft_ops.py): its own copies of the embedding and head (one `mtpd train-drafter
    --kind block` trains uses the target's, its head over the most frequent tokens); row i gives
    the token at p+i+1 (B proposals); a Markov head adds w2(w1[previous token]) to each row's logits in order
    (vanilla; gated: w1[prev] times sigmoid(gate_proj([h; w1[prev]])); rnn: a GRU-like state over
    the block), and a confidence head sigmoid(proj([h; w1[prev]] or h)) predicts each row's
    acceptance.
The engine treats a block like any k drafts (daemon.drafting.block_session); its cost is one
drafter forward whatever k (policies.cost).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache
from mlx_lm.models.qwen3 import MLP
from mlx_lm.models.rope_utils import initialize_rope

from daemon.cpu.fast_block import row_bounds
from daemon.engine.forward import PREFILL_CHUNK, feature_source
from daemon.models.target import full_vocab, head_rows, target_embedding, target_head

KINDS = ("dflash", "dspark")
MARKOV_TYPES = ("vanilla", "gated", "rnn")


@dataclass
class BlockConfig:
    target: dict  # the target's config
    kind: str  # "dflash" or "dspark": which rows propose and whose embedding and head (module docstring)
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    block_size: int
    mask_token_id: int
    target_layer_ids: list[int] = field(default_factory=list)
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    attention_bias: bool = False
    markov_rank: int = 0  # 0: no Markov head
    markov_head_type: str = "vanilla"
    confidence_head: bool = False
    confidence_with_markov: bool = False  # the confidence head reads w1[previous token] beside h
    own_embedding: bool = False  # it ships its own embed_tokens and lm_head (DSpark's sidecars); else the target's
    # every block row's input also holds the last context row (in_proj([e; c_{p-1}])), as an MTP layer's
    # eh_proj holds h_{p-1}: mtpd's own trained block drafters
    reads_last: bool = False
    head_vocab: list[int] | None = field(default=None, repr=False)  # the target's head over these token ids alone

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"block drafter kind must be one of {KINDS}, not {self.kind!r}")
        if self.markov_rank and self.markov_head_type not in MARKOV_TYPES:
            raise ValueError(f"markov_head_type must be one of {MARKOV_TYPES}, not {self.markov_head_type!r}")
        if self.confidence_with_markov and not self.markov_rank:
            raise ValueError("a confidence head with the Markov head's input needs markov_rank > 0")
        top = self.target["num_hidden_layers"] - 1
        ids = list(self.target_layer_ids)
        if not ids or any(not -1 <= i <= top for i in ids) or ids != sorted(set(ids)):
            raise ValueError(f"target_layer_ids {ids} must be increasing target layers (-1: the embedding, 0..{top})")
        if self.hidden_size != self.target["hidden_size"]:
            raise ValueError(f"block drafter hidden size {self.hidden_size} does not match the target's "
                             f"{self.target['hidden_size']}")
        if self.block_size < 2:
            raise ValueError("block_size must be 2 or more")

    @property
    def source(self) -> str:
        """What it reads from the target's forward (daemon.engine.forward.HiddenTap.hidden)."""
        return feature_source("layers", self.target_layer_ids)

    @property
    def width(self) -> int:
        return self.hidden_size * len(self.target_layer_ids)

    @property
    def first_row(self) -> int:
        """The block row of the first proposal: DFlash's mask rows give their own tokens."""
        return 1 if self.kind == "dflash" else 0

    @property
    def proposals(self) -> int:
        return self.block_size - self.first_row

    reads_offers = False  # the chained drafter's option (daemon.models.mtp); a block reads no lookup offers


class BlockAttention(nn.Module):
    def __init__(self, c: BlockConfig):
        super().__init__()
        self.n_heads, self.n_kv = c.num_attention_heads, c.num_key_value_heads
        self.scale = c.head_dim**-0.5
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)
        self.q_norm = nn.RMSNorm(c.head_dim, eps=c.rms_norm_eps)
        self.k_norm = nn.RMSNorm(c.head_dim, eps=c.rms_norm_eps)

    def _keys(self, x: mx.array) -> tuple[mx.array, mx.array]:
        b, n, _ = x.shape
        keys = self.k_norm(self.k_proj(x).reshape(b, n, self.n_kv, -1)).transpose(0, 2, 1, 3)
        return keys, self.v_proj(x).reshape(b, n, self.n_kv, -1).transpose(0, 2, 1, 3)

    def read(self, context: mx.array, rope, cache: KVCache) -> tuple[mx.array, mx.array]:
        """Appends the context rows [1, S, H] to the cache at their positions; all its keys and values."""
        return self._append(*self._keys(context), rope, cache)

    @staticmethod
    def _append(keys: mx.array, values: mx.array, rope, cache: KVCache) -> tuple[mx.array, mx.array]:
        return cache.update_and_fetch(rope(keys, offset=cache.offset), values)

    def __call__(self, x: mx.array, context: mx.array, bounds: list[tuple[int, int]], caches: list[KVCache], rope,
                 size: int) -> mx.array:
        """Several sequences' blocks at once: x [1, n * size, H] their block rows (normed) end to
        end, `context` [1, S, H] their new context rows end to end (`bounds`: each one's), each
        appended to its own cache; every projection runs once over all rows, attention per
        sequence over its context and its own block."""
        b, n, _ = x.shape
        queries = self.q_norm(self.q_proj(x).reshape(b, n, self.n_heads, -1)).transpose(0, 2, 1, 3)
        own_keys, own_values = self._keys(x)
        context_keys, context_values = self._keys(context)
        outs = []
        for i, ((start, end), cache) in enumerate(zip(bounds, caches)):
            keys, values = self._append(context_keys[:, :, start:end], context_values[:, :, start:end], rope, cache)
            rows = slice(i * size, (i + 1) * size)
            keys = mx.concatenate([keys, rope(own_keys[:, :, rows], offset=cache.offset)], axis=2)
            values = mx.concatenate([values, own_values[:, :, rows]], axis=2)
            outs.append(mx.fast.scaled_dot_product_attention(rope(queries[:, :, rows], offset=cache.offset), keys, values,
                                                             scale=self.scale))
        out = mx.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, n, -1))


class BlockLayer(nn.Module):
    def __init__(self, c: BlockConfig):
        super().__init__()
        self.self_attn = BlockAttention(c)
        self.mlp = MLP(c.hidden_size, c.intermediate_size)
        self.input_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def __call__(self, x: mx.array, context: mx.array, bounds, caches: list[KVCache], rope, size: int) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), context, bounds, caches, rope, size)
        return h + self.mlp(self.post_attention_layernorm(h))


class MarkovHead(nn.Module):
    """DSpark's `markov_head`: a bias on a row's logits from the token before it."""

    def __init__(self, c: BlockConfig):
        super().__init__()
        self.kind, self.rank = c.markov_head_type, c.markov_rank
        self.markov_w1 = nn.Embedding(c.vocab_size, c.markov_rank)
        self.markov_w2 = nn.Linear(c.markov_rank, c.vocab_size, bias=False)
        if self.kind == "gated":
            self.gate_proj = nn.Linear(c.hidden_size + c.markov_rank, c.markov_rank)
        elif self.kind == "rnn":
            self.joint_proj = nn.Linear(2 * c.markov_rank + c.hidden_size, 3 * c.markov_rank)

    def step(self, logits: mx.array, previous: mx.array, h: mx.array, state: mx.array) -> tuple[mx.array, mx.array]:
        """One row: logits [V] + the bias from `previous` [1] (the token before the row) and the
        row's hidden state h [1, H]; `state` [1, r]: the rnn head's, zeros at the block's start.
        Returns (logits [V], state)."""
        e = self.markov_w1(previous)
        if self.kind == "gated":
            e = e * mx.sigmoid(self.gate_proj(mx.concatenate([h, e], axis=-1)))
        elif self.kind == "rnn":
            gate, candidate, output = mx.split(self.joint_proj(mx.concatenate([state, e, h], axis=-1)), 3, axis=-1)
            gate = mx.sigmoid(gate)
            state = gate * state + (1.0 - gate) * mx.tanh(candidate)
            e = mx.tanh(output)
        return logits + self.markov_w2(e)[0], state


class ConfidenceHead(nn.Module):
    """DSpark's `confidence_head` (AcceptRatePredictor): a row's acceptance, predicted."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, 1)

    def __call__(self, features: mx.array) -> mx.array:
        return mx.sigmoid(self.proj(features))[..., 0]


class BlockDrafter(nn.Module):
    """The drafter of the module docstring, for one sequence or several at once (`draft_ragged`)."""

    ragged = True  # several sequences' blocks run in one forward (daemon.engine.ragged.run_drafts)

    def __init__(self, config: BlockConfig):
        super().__init__()
        c = self.config = config
        self.fc = nn.Linear(c.width, c.hidden_size, bias=False)
        self.hidden_norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.layers = [BlockLayer(c) for _ in range(c.num_hidden_layers)]
        self.norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        if c.reads_last:
            self.in_proj = nn.Linear(2 * c.hidden_size, c.hidden_size, bias=False)
        if c.own_embedding:  # its own copies of the target's
            self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self._vocab_map = mx.array(c.head_vocab) if c.head_vocab else None
        object.__setattr__(self, "_subset_head", None)  # (target, its head rows for head_vocab): target.head_rows
        if c.markov_rank:
            self.markov_head = MarkovHead(c)
        if c.confidence_head:
            self.confidence_head = ConfidenceHead(c.hidden_size + (c.markov_rank if c.confidence_with_markov else 0))
        self.rope = initialize_rope(c.head_dim, base=c.rope_theta, traditional=False, scaling_config=c.rope_scaling,
                                    max_position_embeddings=c.max_position_embeddings)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def context(self, hidden: mx.array) -> mx.array:
        """The target's tapped states [1, S, taps * H] fused into context rows [1, S, H]."""
        return self.hidden_norm(self.fc(hidden))

    def read(self, hidden: mx.array, caches: list[KVCache]) -> list[mx.array]:
        """Appends context positions (tapped states [1, S, taps * H]) to every layer's cache without
        running a block, in chunks; returns the cached keys to evaluate."""
        out = []
        for start in range(0, hidden.shape[1], PREFILL_CHUNK):
            context = self.context(hidden[:, start : start + PREFILL_CHUNK])
            out = [layer.self_attn.read(context, self.rope, cache)[0] for layer, cache in zip(self.layers, caches)]
        return out

    def __call__(self, hiddens: list[mx.array], blocks: list[list[int]], caches: list[list[KVCache]], target) -> mx.array:
        """Several sequences at once (one alone is a list of one): each one's context positions not
        read yet (tapped states [1, S_i, taps * H]) are appended to its caches, then its block runs
        after them. Returns the blocks' states after the final norm, end to end [1, n * B, H]."""
        hidden = mx.concatenate(hiddens, axis=1) if len(hiddens) > 1 else hiddens[0]
        context, bounds = self.context(hidden), row_bounds(h.shape[1] for h in hiddens)
        tokens = mx.array([[t for block in blocks for t in block]])
        last = mx.array([end - 1 for _, end in bounds for _ in range(len(blocks[0]))])
        x = self.block_input(tokens, context[:, last], target)
        for j, layer in enumerate(self.layers):
            x = layer(x, context, bounds, [c[j] for c in caches], self.rope, len(blocks[0]))
        return self.norm(x)

    def block_input(self, tokens: mx.array, last: mx.array, target) -> mx.array:
        """The block rows' input: their tokens' embeddings, with `reads_last` the context row before
        each one's block beside them (last: [B, n, H], one per row)."""
        e = (self.embed_tokens if "embed_tokens" in self else target_embedding(target))(tokens)
        return self.in_proj(mx.concatenate([e, last], axis=-1)) if "in_proj" in self else e

    def head_logits(self, h: mx.array, target) -> mx.array:
        """Logits over the head's vocabulary: `head_vocab` when set, else the full one."""
        if "lm_head" in self:
            return self.lm_head(h)
        if self._vocab_map is None:
            return target_head(target)(h)
        return h @ head_rows(self, target, self._vocab_map).T

    def logits(self, h: mx.array, target) -> mx.array:
        return full_vocab(self.head_logits(h, target), self._vocab_map, self.config.vocab_size)

    def draft(self, hidden: mx.array, tokens: mx.array, caches: list[KVCache], target, offers=None):
        """One block forward (daemon.engine.rows.DraftCall): (the proposal rows' logits [P, V] before
        the Markov head, their states [1, P, H])."""
        h = self([hidden], [tokens[0].tolist()], [caches], target)[:, self.config.first_row :]
        return self.logits(h, target)[0], h

    def draft_ragged(self, calls: list, target) -> list[tuple[mx.array, mx.array]]:
        """`draft` for several sequences (daemon.engine.rows.DraftCall each) in one forward; the head once over all."""
        size, first = self.config.block_size, self.config.first_row
        h = self([c.hidden for c in calls], [c.tokens for c in calls], [c.cache for c in calls], target)
        rows = mx.concatenate([h[:, i * size + first : (i + 1) * size] for i in range(len(calls))], axis=1)
        logits, per = self.logits(rows, target)[0], size - first
        return [(logits[i * per : (i + 1) * per], rows[:, i * per : (i + 1) * per]) for i in range(len(calls))]

    def confidence(self, h: mx.array, previous: mx.array) -> mx.array | None:
        """A row's predicted acceptance (its state h [1, H], the token before it [1]), or None
        without a confidence head."""
        if "confidence_head" not in self:
            return None
        if self.config.confidence_with_markov:
            h = mx.concatenate([h, self.markov_head.markov_w1(previous)], axis=-1)
        return self.confidence_head(h)[0]


def is_block(drafter) -> bool:
    return isinstance(drafter, BlockDrafter)

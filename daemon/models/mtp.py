"""The MTP drafter: DeepSeek-V3's multi-token-prediction module, chained on its own output.

For target position i it reads the target's hidden state h_i and the next token t_{i+1}:
    x = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])     # embedding first (MiMo: hidden first)
    x = block(x)                                         # one decoder block of the target's family
    logits = head(shared_head.norm(x))                   # head shared with the target by default
and predicts t_{i+2}. For k > 1 the same module is fed its own block output and the token it just
drafted. It has its own KV cache, aligned with the target's positions. The families' own MTP
layers map onto these names (daemon.models.families states each one's forward).

A drafter we train may also read the outputs of some of the target's blocks at position i
(`feature_layers`, EAGLE-3's lower- and middle-layer features), each behind its own norm
(`fnorms`) after hnorm(h_i) in eh_proj's input; a chained draft keeps those of the last real
position. It may also read what the context lookup offers as the token it drafts (`reads_offers`:
onorm(embed(offered token)) + match_embed(n-gram length), last in eh_proj's input; zero when the
lookup offers nothing), so that it learns when copying from the context is right.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import CacheList

from daemon.cpu.fast_block import FastBlock, row_bounds
from daemon.engine.forward import feature_source
from daemon.models import family
from daemon.models.target import SharedHead, full_vocab, head_rows, target_embedding, target_head

HIDDEN_SOURCES = ("post_norm", "pre_norm", "streams")  # streams: a hyper-connection trunk's (DeepSeek V4)
COMBINES = ("embedding_first", "hidden_first")
BLOCK_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp", "attn_hc", "ffn_hc", "sublayers")
MATCH_CLASSES = 5  # offer match lengths 0 (none) .. 4 (daemon.drafting.lookup.NgramIndex's n_max)


@dataclass
class DrafterConfig:
    target: dict  # the target family's config (model_type + args); the block is built from it
    layer_index: int  # index of the MTP block in the checkpoint (num_hidden_layers for DeepSeek-V3)
    hidden_source: str = "post_norm"  # which target hidden state h_i is: after or before its final norm, or the streams
    own_head: bool = False  # the drafter ships `shared_head.head` (else the target's head is used)
    head_vocab: list[int] | None = field(default=None, repr=False)  # own head over these token ids
    feature_layers: list[int] = field(default_factory=list)  # target blocks whose outputs it also reads
    reads_offers: bool = False  # it also reads the context lookup's offer (daemon.drafting.lookup.NgramIndex.offers)
    combine: str = "embedding_first"  # eh_proj's input order: [e; h] (DeepSeek, Qwen) or [h; e] (MiMo)

    def __post_init__(self):
        if self.hidden_source not in HIDDEN_SOURCES:
            raise ValueError(f"hidden_source must be one of {HIDDEN_SOURCES}, not {self.hidden_source!r}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, not {self.combine!r}")
        if any(not 0 <= b < self.target["num_hidden_layers"] for b in self.feature_layers):
            top = self.target["num_hidden_layers"] - 1
            raise ValueError(f"feature_layers {self.feature_layers} must be blocks of the target (0..{top})")

    @property
    def source(self) -> str:
        """What it reads from the target's forward (daemon.engine.forward.HiddenTap.hidden)."""
        return feature_source(self.hidden_source, self.feature_layers)

    @property
    def eps(self) -> float:
        """The norms' epsilon, under the target config's name for it (Nemotron-H's layer_norm_epsilon)."""
        return self.target["rms_norm_eps"] if "rms_norm_eps" in self.target else self.target["layer_norm_epsilon"]

    @property
    def width(self) -> int:
        """The size of one position's hidden input."""
        hidden = self.target["hidden_size"]
        if self.hidden_source == "streams":
            return self.target["hc_mult"] * (hidden + 1)  # daemon.engine.forward.join_streams
        return hidden * (1 + len(self.feature_layers))


class MTPDrafter(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        hidden, eps = config.target["hidden_size"], config.eps
        self.enorm = nn.RMSNorm(hidden, eps=eps)
        self.hnorm = nn.RMSNorm(hidden, eps=eps)
        if config.feature_layers:
            self.fnorms = [nn.RMSNorm(hidden, eps=eps) for _ in config.feature_layers]
        if config.reads_offers:
            self.onorm = nn.RMSNorm(hidden, eps=eps)
            self.match_embed = nn.Embedding(MATCH_CLASSES, hidden)
        self.eh_proj = nn.Linear((2 + len(config.feature_layers) + config.reads_offers) * hidden, hidden, bias=False)
        self.block = family.block(config.target, config.layer_index)
        vocab = None
        if config.own_head:
            vocab = len(config.head_vocab) if config.head_vocab else config.target["vocab_size"]
        self.shared_head = SharedHead(hidden, eps, vocab)
        self._array_mask = family.array_mask(config.target["model_type"])
        self._vocab_map = mx.array(config.head_vocab) if config.head_vocab else None
        object.__setattr__(self, "_subset_head", None)  # (target, its head rows for head_vocab)
        object.__setattr__(self, "_column_major", True)  # the layout of those rows (`use_layout`)

    def features(self, hidden: mx.array, tokens: mx.array, cache, target, offers=None) -> tuple[mx.array, mx.array]:
        """hidden: [B, L, H * (1 + len(feature_layers))] target (or own, see `chained`) hidden
        states; tokens: [B, L] the tokens after them; offers: (offered tokens [B, L], match
        lengths [B, L], 0 where none) when it reads offers. Returns (shared_head.norm output
        [B, L, H], block output [B, L, H] for chaining)."""
        x = self._inputs(hidden, tokens, target, offers)
        positions = cache[0] if isinstance(cache, CacheList) else cache  # DeepSeek-V3.2: (attention, indexer)
        mask = create_attention_mask(x, positions, return_array=self._array_mask)
        x = self.block(x, mask, cache)
        return self.shared_head.norm(x), x

    def _inputs(self, hidden: mx.array, tokens: mx.array, target, offers) -> mx.array:
        """The block's input: eh_proj over the normed embedding, hidden state, features and offer."""
        embed = target_embedding(target)
        e = self.enorm(embed(tokens))
        if "fnorms" in self:
            pieces = mx.split(hidden, len(self.fnorms) + 1, axis=-1)
            h, features = self.hnorm(pieces[0]), [norm(p) for norm, p in zip(self.fnorms, pieces[1:])]
        else:
            h, features = self.hnorm(hidden), []
        parts = [e, h, *features] if self.config.combine == "embedding_first" else [h, e, *features]
        if self.config.reads_offers:
            offered, match = offers
            parts.append(self.onorm(embed(offered)) * (match > 0)[..., None] + self.match_embed(match))
        return self.eh_proj(mx.concatenate(parts, axis=-1))

    @property
    def ragged(self) -> bool:
        """Whether several sequences' drafts run in one forward (`draft_ragged`): a FastBlock."""
        return isinstance(self.block, FastBlock)

    def draft_ragged(self, calls: list, target) -> list[tuple[mx.array, mx.array]]:
        """`draft` for several sequences at once (daemon.engine.rows.DraftCall: each its rows, its
        plain KV cache): their rows laid end to end, attention per sequence on its own cache
        (FastBlock.ragged), everything else, the head included, once over all. Returns each
        one's (logits [1, V] of its last row, block output [1, L, H])."""
        bounds = row_bounds(len(c.tokens) for c in calls)
        offers = None
        if self.config.reads_offers:
            offers = tuple(mx.concatenate([c.offers[i] for c in calls], axis=1) for i in range(2))
        hidden = mx.concatenate([c.hidden for c in calls], axis=1)
        x = self._inputs(hidden, mx.array([[t for c in calls for t in c.tokens]]), target, offers)
        positions = mx.array([c.cache.offset + j for c in calls for j in range(len(c.tokens))])
        x = self.block.ragged(x, positions, bounds, [c.cache for c in calls])
        last = self.shared_head.norm(x[:, mx.array([e - 1 for _, e in bounds])])
        logits = self._full_vocab(self.head_logits(last, target))
        return [(logits[:, i], x[:, s:e]) for i, (s, e) in enumerate(bounds)]

    def chained(self, own: mx.array, hidden: mx.array) -> mx.array:
        """The hidden input of a chained draft: its own block output [B, L, H] in place of the final
        state, the block features of `hidden` (the same rows' real hidden input) kept."""
        if "fnorms" not in self:
            return own
        return mx.concatenate([own, hidden[..., own.shape[-1] :]], axis=-1)

    def head_logits(self, out: mx.array, target) -> mx.array:
        """Logits over the head's vocabulary: `head_vocab` when set, else the full one."""
        if "head" in self.shared_head:
            return self.shared_head.head(out)
        if self._vocab_map is None:
            return target_head(target)(out)
        return out @ head_rows(self, target, self._vocab_map, self._column_major).T

    def use_layout(self, column_major: bool) -> None:
        """The layout of the head's rows for head_vocab, as the target's weights have it
        (daemon.cpu.forms: on some machines column-major products are slower)."""
        object.__setattr__(self, "_column_major", column_major)
        object.__setattr__(self, "_subset_head", None)

    def __call__(self, hidden: mx.array, tokens: mx.array, cache, target, offers=None) -> tuple[mx.array, mx.array]:
        """Returns (logits [B, L, V] over the full vocabulary, block output [B, L, H])."""
        out, x = self.features(hidden, tokens, cache, target, offers)
        return self._full_vocab(self.head_logits(out, target)), x

    def draft(self, hidden: mx.array, tokens: mx.array, cache, target, offers=None) -> tuple[mx.array, mx.array]:
        """Like calling the drafter, but the head runs on the last position alone (the one a draft
        is taken from; the others only fill the cache). Returns (logits [B, V], block output [B, L, H])."""
        out, x = self.features(hidden, tokens, cache, target, offers)
        return self._full_vocab(self.head_logits(out[:, -1], target)), x

    def _full_vocab(self, logits: mx.array) -> mx.array:
        return full_vocab(logits, self._vocab_map, self.config.target["vocab_size"])

    def make_cache(self):
        return family.make_cache(self.config.target)


class MTPLayers(nn.Module):
    """Several MTP layers of one checkpoint, in order: in a round, layer j drafts the (j+1)-th token
    from layer j - 1's outputs (daemon.drafting.session); the first says what the target must give."""

    def __init__(self, layers: list):
        super().__init__()
        self.layers = layers

    @property
    def config(self) -> DrafterConfig:
        return self.layers[0].config


def mtp_layers(drafter) -> list:
    """A drafter's MTP layers in order: one, unless it is MTPLayers."""
    return list(drafter.layers) if isinstance(drafter, MTPLayers) else [drafter]


def offer_arrays(drafter, offers: list[tuple[int, int]]):
    """A drafter's `offers` argument for one row of (token, match) pairs (daemon.drafting.lookup); None
    when it does not read them."""
    if not drafter.config.reads_offers:
        return None
    return mx.array([[t for t, _ in offers]]), mx.array([[min(n, MATCH_CLASSES - 1) for _, n in offers]])



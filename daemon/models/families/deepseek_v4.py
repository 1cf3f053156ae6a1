"""DeepSeek V4 / V4.1 (deepseek_v41): an MTP layer on hyper-connection streams.

Reference: DeepSeek's `inference/model.py` (MTPBlock.forward, ParallelHead.hc_head) and vLLM
`vllm/model_executor/models/deepseek_v4_mtp.py` (DeepSeekV4MultiTokenPredictorLayer.forward):
    s = h_proj(hnorm(S_i)) + e_proj(enorm(embed(t_{i+1})))   # per stream: separate projections, summed;
                                                              # S_i [hc, H]: the target's streams after
                                                              # its last layer, before their collapse
    s, p = the family's decoder layer (s, P_i)                # mlx-lm's layer collapses its input with the
                                                              # pre-mix it is given: P_i, the one the
                                                              # target collapses S_i with
    logits = head(norm(hc_head(s)))                           # its own collapse (a sigmoid mix of the
                                                              # streams), then the target's head
Keys `mtp.{i}.*` under DeepSeek's own names (mlx-lm's sanitize drops them); the block's tensors go
through the family's sanitize (renames, expert stacking, fp8/fp4 scales). Plain RMSNorm weights. A
chained draft reads its own (s, p). Several layers draft the later positions in turn
(daemon.drafting.session).
"""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn

from daemon.engine.forward import join_streams, split_streams
from daemon.models.target import SharedHead, target_embedding, target_head

FAMILIES = ("deepseek_v41",)
COMBINE = "embedding_first"
HIDDEN = "streams"
FORWARD = {
    "hidden": "the hyper-connection streams after the last layer, and their pre-mix",
    "combine": "h_proj(hnorm(streams)) + e_proj(enorm(e)) per stream",
    "norms": "RMSNorm (w)",
    "head": "its own hc_head collapse, norm, then the target's head (or mtp.{i}.head)",
    "layers": "mtp.{i}",
}
LAYER = re.compile(r"^mtp\.(\d+)\.")
_OWN = {"e_proj": "e_proj", "h_proj": "h_proj", "enorm": "enorm", "hnorm": "hnorm", "norm": "shared_head.norm",
        "head": "shared_head.head", "hc_head_fn": "hc_head.fn", "hc_head_base": "hc_head.base",
        "hc_head_scale": "hc_head.scale"}


def is_mtp(key: str, config: dict) -> bool:
    return key.startswith("mtp.")


def unsupported(keys) -> str | None:
    """Why the `mtp.*` tensors are not an MTP layer mtpd runs, told by their names (never by
    num_nextn_predict_layers, which V4-Flash-0731 sets to 1 as well): DeepSeek's DSpark blocks
    (V4-Flash-0731, V4.1-Flash: `main_proj`, `main_norm`, a Markov head, no e_proj / h_proj)."""
    if any(re.match(r"^mtp\.\d+\.(main_proj|main_norm|markov_head|confidence_head)\.", k) for k in keys):
        return ("its mtp.* tensors are DeepSeek DSpark blocks (main_proj, main_norm, a Markov head), not an MTP "
                "layer; mtpd does not run V4 DSpark blocks yet")
    return None


def convert(mtp: dict, weights: dict, config: dict, sanitize) -> list[dict]:
    """Each MTP layer: its own tensors renamed here, its block's through the family's sanitize as
    if it were the trunk's layer 0; its copy of the embedding (`emb.*`) is the target's."""
    own: dict[int, dict] = {}
    blocks: dict[int, dict] = {}
    for key, value in mtp.items():
        index, _, rest = key.removeprefix("mtp.").partition(".")
        head, _, tail = rest.partition(".")
        if head in _OWN:
            own.setdefault(int(index), {})[_OWN[head] + (f".{tail}" if tail else "")] = value
        elif head != "emb":
            blocks.setdefault(int(index), {})[f"layers.0.{rest}"] = value
    return [{**own[i], **{k.removeprefix("model.layers.0."): v for k, v in sanitize(blocks[i]).items()}}
            for i in sorted(own)]


def make_cache(config: dict):
    from mlx_lm.models.deepseek_v41 import LayerCache, ModelArgs

    return LayerCache(ModelArgs.from_dict(config).sliding_window)


def block(config: dict, layer_index: int):
    from mlx_lm.models import deepseek_v41 as m

    return m.DecoderLayer(m.ModelArgs.from_dict(config), layer_index)


def combine(drafter, e: mx.array, streams: mx.array) -> mx.array:
    """The layer's input streams [B, L, hc, H] from enorm(e) [B, L, H] and the target's streams."""
    return drafter.h_proj(drafter.hnorm(streams)) + drafter.e_proj(e)[..., None, :]


class HeadMix(nn.Module):
    """DeepSeek V4's head collapse: one sigmoid weight per stream, from the RMS-normed streams."""

    def __init__(self, hc: int, hidden: int, eps: float, hc_eps: float):
        super().__init__()
        self.fn = mx.zeros((hc, hc * hidden))
        self.base = mx.zeros((hc,))
        self.scale = mx.ones((1,))
        self._eps, self._hc_eps = eps, hc_eps

    def __call__(self, streams: mx.array) -> mx.array:
        flat = streams.reshape(*streams.shape[:2], -1).astype(mx.float32)
        mix = (flat @ self.fn.T) * mx.rsqrt(mx.mean(flat * flat, axis=-1, keepdims=True) + self._eps)
        pre = mx.sigmoid(mix * self.scale + self.base) + self._hc_eps
        return mx.sum(pre[..., None] * streams.astype(mx.float32), axis=2).astype(streams.dtype)


class Drafter(nn.Module):
    """The MTP drafter's interface (daemon.models.mtp.MTPDrafter) for a DeepSeek V4 MTP layer."""

    def __init__(self, config):
        super().__init__()
        from mlx_lm.models.deepseek_v41 import ModelArgs, _window_indices

        self.config = config
        args = ModelArgs.from_dict(config.target)
        hidden, eps = args.hidden_size, args.rms_norm_eps
        self.enorm = nn.RMSNorm(hidden, eps=eps)
        self.hnorm = nn.RMSNorm(hidden, eps=eps)
        self.e_proj = nn.Linear(hidden, hidden, bias=False)
        self.h_proj = nn.Linear(hidden, hidden, bias=False)
        self.block = block(config.target, config.layer_index)
        self.hc_head = HeadMix(args.hc_mult, hidden, eps, args.hc_eps)
        self.shared_head = SharedHead(hidden, eps, args.vocab_size if config.own_head else None)
        self._hc, self._window, self._indices = args.hc_mult, args.sliding_window, _window_indices

    def features(self, hidden: mx.array, tokens: mx.array, cache, target) -> tuple[mx.array, mx.array]:
        """hidden [B, L, hc * (H + 1)]: the target's (or its own) streams and pre-mix; tokens [B, L]:
        the tokens after them. Returns (norm(hc_head(s)) [B, L, H], (s, p) joined for chaining)."""
        streams, pre_mix = split_streams(hidden, self._hc)
        dtype = self.hnorm.weight.dtype  # (a quantized e_proj holds packed integers)
        e = self.enorm(target_embedding(target)(tokens))
        s = combine(self, e, streams.astype(dtype))
        previous = 0 if cache.window is None else cache.window.shape[1]
        window = self._indices(previous=previous, length=s.shape[1], window=self._window)
        s, p = self.block(s, pre_mix, start_pos=cache.offset, window_idx=mx.broadcast_to(window, (s.shape[0], *window.shape)),
                          cache=cache, shared={})
        return self.shared_head.norm(self.hc_head(s)), join_streams(s, p)

    def chained(self, own: mx.array, hidden: mx.array) -> mx.array:
        return own

    def head_logits(self, out: mx.array, target) -> mx.array:
        return self.shared_head.head(out) if "head" in self.shared_head else target_head(target)(out)

    def __call__(self, hidden, tokens, cache, target, offers=None) -> tuple[mx.array, mx.array]:
        """(logits [B, L, V], the chain's input [B, L, hc * (H + 1)])."""
        out, x = self.features(hidden, tokens, cache, target)
        return self.head_logits(out, target), x

    def draft(self, hidden, tokens, cache, target, offers=None) -> tuple[mx.array, mx.array]:
        """The head on the last position alone: (logits [B, V], the chain's input)."""
        out, x = self.features(hidden, tokens, cache, target)
        return self.head_logits(out[:, -1], target), x

    def make_cache(self):
        return make_cache(self.config.target)

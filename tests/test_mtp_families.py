"""Each family's own MTP layer, from a tiny checkpoint in its released key layout: every tensor
consumed, the drafter's logits equal to an independent reference of the family's MTP forward
(written from vLLM's `*_mtp.py`, cited per family in daemon/models/families), and speculation lossless."""

import mlx.core as mx
import numpy as np
import pytest
from families import write_with_mtp
from mlx_lm.models.base import create_attention_mask

from daemon.engine.forward import hidden_tap
from daemon.engine.generate import generate
from daemon.engine.records import Request
from daemon.models.families import deepseek_v4, mimo, qwen3_next
from daemon.models.loading import load
from daemon.models.target import target_embedding, target_head_weight, trunk
from policies.fixed import Fixed

PROMPT = (1, 80, 120, 7, 200, 33, 150)
MTP_FAMILIES = ["deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite", "qwen3_5", "qwen3_next", "mimo",
                "deepseek_v41"]


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("mtp")
    vocab = tiny_lm.config["vocab_size"]
    return {f: (root / f, write_with_mtp(root / f, f, tiny_lm.tokenizer, vocab, seed=1)) for f in MTP_FAMILIES}


def rms(x, w, eps):
    return x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps) * w


def reference_logits(ref: dict, lm, ids) -> mx.array:
    """The MTP forward over positions 0..L-2 (h_i, t_{i+1}) -> logits for t_{i+2}, [1, L-1, V]."""
    if lm.config["model_type"] == "deepseek_v41":
        return reference_v4_logits(ref, lm, ids)
    eps = lm.config["rms_norm_eps"]
    tokens = mx.array([ids])
    h = trunk(lm.model)(tokens)[:, :-1]  # after the final norm
    e = target_embedding(lm.model)(tokens[:, 1:])
    parts = [rms(e, ref["enorm"], eps), rms(h, ref["hnorm"], eps)]
    if ref["order"] == "hidden_first":
        parts.reverse()
    x = mx.concatenate(parts, axis=-1) @ ref["proj"].T
    x = ref["block"](x, create_attention_mask(x, None, return_array=True), None)
    head = ref["head"] if ref["head"] is not None else target_head_weight(lm.model)
    return rms(x, ref["norm"], eps) @ head.T


def reference_v4_logits(ref: dict, lm, ids) -> mx.array:
    """DeepSeek's MTPBlock.forward and ParallelHead.hc_head (`inference/model.py`) on mlx-lm's V4.1
    layers: the trunk's streams S and pre-mix P after its last layer; x = h_proj(hnorm(S)) +
    e_proj(enorm(e)); the layer on (x, P); its own sigmoid collapse; norm; the target's head."""
    from mlx_lm.models.deepseek_v41 import LayerCache, _window_indices

    config, eps, tokens = lm.config, lm.config["rms_norm_eps"], mx.array([ids])
    hc, length = config["hc_mult"], len(ids) - 1
    body = trunk(lm.model)

    def window(n):
        return _window_indices(previous=0, length=n, window=config["sliding_window"])[None]

    h = body.embed_tokens(tokens)
    streams, pre = mx.broadcast_to(h[:, :, None], (1, len(ids), hc, h.shape[-1])), mx.zeros((1, len(ids), hc)).at[..., 0].add(1.0)
    shared = {}
    for layer in body.layers:
        streams, pre = layer(streams, pre, start_pos=0, window_idx=window(len(ids)), cache=LayerCache(8), shared=shared)
    e = rms(target_embedding(lm.model)(tokens[:, 1:]), ref["enorm"], eps)
    x = rms(streams[:, :-1], ref["hnorm"], eps) @ ref["proj"].T + (e @ ref["e_proj"].T)[:, :, None]
    x, _ = ref["block"](x, pre[:, :-1], start_pos=0, window_idx=window(length), cache=LayerCache(8), shared={})
    fn, base, scale = ref["hc_head"]
    flat = x.reshape(1, length, -1)
    mix = (flat @ fn.T) * mx.rsqrt(mx.mean(flat * flat, axis=-1, keepdims=True) + eps)
    weights = mx.sigmoid(mix * scale + base) + config["hc_eps"]
    y = mx.sum(weights[..., None] * x, axis=2)
    return rms(y, ref["norm"], eps) @ target_head_weight(lm.model).T


def drafter_logits(lm, ids) -> mx.array:
    tokens = mx.array([ids])
    tap = hidden_tap(lm.model, lm.drafter.config.source)
    lm.model(tokens)
    h = tap.hidden(lm.drafter.config.source)[:, :-1]
    return lm.drafter(h, tokens[:, 1:], lm.drafter.make_cache(), lm.model)[0]


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_mtp_layer_matches_the_reference_forward(written, family):
    folder, ref = written[family]
    lm = load(str(folder))  # the drafter loads strictly: every MTP tensor used, none missing
    assert lm.drafter_name.endswith("(built-in MTP)")
    ours, theirs = drafter_logits(lm, PROMPT), reference_logits(ref, lm, PROMPT)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_speculation_with_the_mtp_layer_is_lossless(written, family):
    lm = load(str(written[family][0]))
    plain = list(generate(lm, Request(PROMPT, max_tokens=24), Fixed(0)))[-1]
    assert len(plain.token_ids) > 4
    for k in (1, 2, 3):
        spec = list(generate(lm, Request(PROMPT, max_tokens=24), Fixed(k)))[-1]
        assert spec.token_ids == plain.token_ids and spec.stats.drafted > 0, k


@pytest.mark.parametrize("family", ["qwen3_5", "mimo", "deepseek_v41"])
def test_quantized_mtp_layer_loads_and_stays_lossless(written, family):
    lm = load(str(written[family][0]), drafter_bits=4)
    assert lm.drafter is not None
    plain = list(generate(lm, Request(PROMPT, max_tokens=16), Fixed(0)))[-1]
    spec = list(generate(lm, Request(PROMPT, max_tokens=16), Fixed(2)))[-1]
    assert spec.token_ids == plain.token_ids and spec.stats.drafted > 0


def test_a_wrong_adapter_fails_the_reference(written, monkeypatch):
    """The reference test has teeth: the norms' +1 missed (Qwen3.5), the concatenation swapped (MiMo),
    the embedding's and the hidden state's projections swapped (DeepSeek V4)."""
    def swapped(drafter, e, streams):
        return drafter.e_proj(drafter.hnorm(streams)) + drafter.h_proj(e)[..., None, :]

    for family, module, name, wrong in [("qwen3_5", qwen3_next, "zero_centred", lambda *_: False),
                                        ("mimo", mimo, "COMBINE", "embedding_first"),
                                        ("deepseek_v41", deepseek_v4, "combine", swapped)]:
        folder, ref = written[family]
        with monkeypatch.context() as m:
            m.setattr(module, name, wrong)
            lm = load(str(folder))
            ours = np.array(drafter_logits(lm, PROMPT))
        assert not np.allclose(ours, np.array(reference_logits(ref, lm, PROMPT)), atol=2e-3, rtol=1e-3), family


@pytest.mark.parametrize("family", ["qwen3_5", "deepseek_v3", "deepseek_v41"])
def test_extracted_drafter_serves_a_conversion_that_dropped_the_layer(written, family, tmp_path):
    """`mtpd drafter extract` reads the MTP tensors alone; `mtpd inspect` tells the stripped copy
    from the original; the extracted folder drafts next to the stripped copy as the layer did inside."""
    import json
    import shutil

    from daemon.models import family as families
    from daemon.models.checkpoint import extract, inspect

    folder, ref = written[family]
    stripped = tmp_path / "stripped"
    shutil.copytree(folder, stripped)
    adapter = families.adapter(family)
    text = families.text_config(json.loads((folder / "config.json").read_text()))
    weights = mx.load(str(folder / "model.safetensors"))
    mx.save_safetensors(str(stripped / "model.safetensors"), {k: v for k, v in weights.items() if not adapter.is_mtp(k, text)})
    assert inspect(str(folder))["mtp_tensors"] > 0 and inspect(str(folder))["plan"].startswith("speculates")
    assert inspect(str(stripped))["mtp_tensors"] == 0 and "drafter extract" in inspect(str(stripped))["plan"]
    assert load(str(stripped)).drafter is None

    extract(str(folder), str(tmp_path / "drafter"))
    lm = load(str(stripped), drafter=str(tmp_path / "drafter"))
    np.testing.assert_allclose(np.array(drafter_logits(lm, PROMPT)), np.array(reference_logits(ref, lm, PROMPT)),
                               atol=2e-3, rtol=1e-3)
    plain = list(generate(lm, Request(PROMPT, max_tokens=16), Fixed(0)))[-1]
    spec = list(generate(lm, Request(PROMPT, max_tokens=16), Fixed(2)))[-1]
    assert spec.token_ids == plain.token_ids and spec.stats.drafted > 0

    extract(str(folder), str(tmp_path / "drafter4"), bits=4)
    quantized = load(str(stripped), drafter=str(tmp_path / "drafter4"))
    spec = list(generate(quantized, Request(PROMPT, max_tokens=16), Fixed(2)))[-1]
    assert spec.token_ids == plain.token_ids and spec.stats.drafted > 0

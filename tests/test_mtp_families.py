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
from daemon.engine.rows import drain
from daemon.models.families import deepseek_v4, mimo, nemotron_h, qwen3_next, step3p5
from daemon.models.loading import load
from daemon.models.mtp import mtp_layers
from daemon.models.target import target_embedding, target_head_weight, trunk
from policies.fixed import Fixed

PROMPT = (1, 80, 120, 7, 200, 33, 150)
MTP_FAMILIES = ["deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite", "qwen3_5", "qwen3_next", "mimo",
                "deepseek_v41", "step3p5", "nemotron_h"]


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("mtp")
    vocab = tiny_lm.config["vocab_size"]
    return {f: (root / f, write_with_mtp(root / f, f, tiny_lm.tokenizer, vocab, seed=1)) for f in MTP_FAMILIES}


def rms(x, w, eps):
    return x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps) * w


def reference_logits(ref: dict, lm, ids) -> mx.array:
    """The MTP forward over positions 0..L-2 (h_i, t_{i+1}) -> logits for t_{i+2}, [1, L-1, V]."""
    return reference_chain(ref, lm, ids)[0]


def reference_chain(ref: dict, lm, ids) -> list[mx.array]:
    """Each MTP layer j as trained (DeepSeek-V3's sequential modules, MiMo's layers): over positions
    i = 0..L-2-j it reads layer j - 1's block output at i (the target's state for j = 0) and
    t_{i+j+1}, and gives the logits for t_{i+j+2} [1, L-1-j, V]."""
    tokens = mx.array([ids])
    v4 = lm.config["model_type"] == "deepseek_v41"
    state = target_v4_state(lm, tokens) if v4 else trunk(lm.model)(tokens)  # h after the final norm
    out = []
    for j, layer in enumerate([ref, *ref["later"]]):
        state = (state[0][:, :-1], state[1][:, :-1]) if v4 else state[:, :-1]
        logits, state = (reference_v4_layer if v4 else reference_layer)(layer, lm, state, tokens[:, j + 1 :])
        out.append(logits)
    return out


def reference_layer(ref: dict, lm, h, next_tokens) -> tuple[mx.array, mx.array]:
    """vLLM's DeepSeek / Qwen3-Next / MiMo MTP layer: (logits, block output)."""
    eps = lm.config.get("rms_norm_eps", lm.config.get("layer_norm_epsilon"))
    e = target_embedding(lm.model)(next_tokens)
    parts = [rms(e, ref["enorm"], eps), rms(h, ref["hnorm"], eps)]
    if ref["order"] == "hidden_first":
        parts.reverse()
    x = mx.concatenate(parts, axis=-1) @ ref["proj"].T
    x = ref["block"](x, create_attention_mask(x, None, return_array=True), None)
    head = ref["head"] if ref["head"] is not None else target_head_weight(lm.model)
    return rms(x, ref["norm"], eps) @ head.T, x


def _window(lm, n):
    from mlx_lm.models.deepseek_v41 import _window_indices

    return _window_indices(previous=0, length=n, window=lm.config["sliding_window"])[None]


def target_v4_state(lm, tokens) -> tuple[mx.array, mx.array]:
    """mlx-lm's V4.1 trunk up to its last layer: the streams S [1, L, hc, H] and the pre-mix P."""
    from mlx_lm.models.deepseek_v41 import LayerCache

    body, hc, length = trunk(lm.model), lm.config["hc_mult"], tokens.shape[1]
    h = body.embed_tokens(tokens)
    streams, pre = mx.broadcast_to(h[:, :, None], (1, length, hc, h.shape[-1])), mx.zeros((1, length, hc)).at[..., 0].add(1.0)
    shared = {}
    for layer in body.layers:
        streams, pre = layer(streams, pre, start_pos=0, window_idx=_window(lm, length), cache=LayerCache(8), shared=shared)
    return streams, pre


def reference_v4_layer(ref: dict, lm, state, next_tokens) -> tuple[mx.array, tuple]:
    """DeepSeek's MTPBlock.forward and ParallelHead.hc_head (`inference/model.py`) on mlx-lm's V4.1
    layer: x = h_proj(hnorm(S)) + e_proj(enorm(e)); the layer on (x, P); its own sigmoid collapse;
    norm; the target's head. Returns (logits, the layer's (streams, pre-mix))."""
    from mlx_lm.models.deepseek_v41 import LayerCache

    eps, (streams, pre), length = lm.config["rms_norm_eps"], state, next_tokens.shape[1]
    e = rms(target_embedding(lm.model)(next_tokens), ref["enorm"], eps)
    x = rms(streams, ref["hnorm"], eps) @ ref["proj"].T + (e @ ref["e_proj"].T)[:, :, None]
    x, p = ref["block"](x, pre, start_pos=0, window_idx=_window(lm, length), cache=LayerCache(8), shared={})
    fn, base, scale = ref["hc_head"]
    flat = x.reshape(1, length, -1)
    mix = (flat @ fn.T) * mx.rsqrt(mx.mean(flat * flat, axis=-1, keepdims=True) + eps)
    weights = mx.sigmoid(mix * scale + base) + lm.config["hc_eps"]
    y = mx.sum(weights[..., None] * x, axis=2)
    return rms(y, ref["norm"], eps) @ target_head_weight(lm.model).T, (x, p)


def drafter_chain(lm, ids) -> list[mx.array]:
    """Our MTP layers over the same positions as `reference_chain`."""
    tokens = mx.array([ids])
    tap = hidden_tap(lm.model, lm.drafter.config.source)
    lm.model(tokens)
    h, out = tap.hidden(lm.drafter.config.source), []
    for j, layer in enumerate(mtp_layers(lm.drafter)):
        logits, h = layer(h[:, :-1], tokens[:, j + 1 :], layer.make_cache(), lm.model)
        out.append(logits)
    return out


def drafter_logits(lm, ids) -> mx.array:
    return drafter_chain(lm, ids)[0]


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


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_quantized_mtp_layer_loads_and_stays_lossless(written, family):
    lm = load(str(written[family][0]), drafter_bits=4)
    assert lm.drafter is not None
    plain = list(generate(lm, Request(PROMPT, max_tokens=16), Fixed(0)))[-1]
    spec = list(generate(lm, Request(PROMPT, max_tokens=16), Fixed(2)))[-1]
    assert spec.token_ids == plain.token_ids and spec.stats.drafted > 0


@pytest.mark.parametrize("family", ["deepseek_v41", "nemotron_h"])
def test_a_drafter_kept_quantized_drafts_and_stays_lossless(written, family):
    """As on a GPU, where the drafter's layers stay quantized (packed integers): the same logits as
    the CPU's rounded floats, and lossless."""
    from daemon.models import drafter_io

    kept, rounded = load(str(written[family][0])), load(str(written[family][0]))
    drafter_io.quantize(kept.drafter, 4, keep_quantized=True)
    drafter_io.quantize(rounded.drafter, 4, keep_quantized=False)
    assert "scales" in (kept.drafter.eh_proj if "eh_proj" in kept.drafter else kept.drafter.e_proj)
    np.testing.assert_allclose(np.array(drafter_logits(kept, PROMPT)), np.array(drafter_logits(rounded, PROMPT)),
                               atol=2e-3, rtol=1e-3)
    plain = list(generate(kept, Request(PROMPT, max_tokens=16), Fixed(0)))[-1]
    spec = list(generate(kept, Request(PROMPT, max_tokens=16), Fixed(2)))[-1]
    assert spec.token_ids == plain.token_ids and spec.stats.drafted > 0


def test_a_wrong_adapter_fails_the_reference(written, monkeypatch):
    """The reference test has teeth: the norms' +1 missed (Qwen3.5, Step-3.5), the concatenation
    swapped (MiMo, Nemotron-H), the embedding's and the hidden state's projections swapped (DeepSeek V4)."""
    def swapped(drafter, e, streams):
        return drafter.e_proj(drafter.hnorm(streams)) + drafter.h_proj(e)[..., None, :]

    for family, module, name, wrong in [("qwen3_5", qwen3_next, "zero_centred", lambda *_: False),
                                        ("mimo", mimo, "COMBINE", "embedding_first"),
                                        ("deepseek_v41", deepseek_v4, "combine", swapped),
                                        ("step3p5", step3p5, "zero_centred", lambda *_: False),
                                        ("nemotron_h", nemotron_h, "COMBINE", "hidden_first")]:
        folder, ref = written[family]
        with monkeypatch.context() as m:
            m.setattr(module, name, wrong)
            lm = load(str(folder))
            ours = np.array(drafter_logits(lm, PROMPT))
        assert not np.allclose(ours, np.array(reference_logits(ref, lm, PROMPT)), atol=2e-3, rtol=1e-3), family


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next", "step3p5", "deepseek_v41", "mimo"])
def test_a_conversion_that_kept_the_mtp_layers_loads_as_the_release(tiny_lm, tmp_path, family):
    """mlx-lm's names and already-shifted norms: the norms are not shifted a second time."""
    ref = write_with_mtp(tmp_path / family, family, tiny_lm.tokenizer, tiny_lm.config["vocab_size"], seed=1,
                         converted=True)
    lm = load(str(tmp_path / family))
    assert lm.drafter_name.endswith("(built-in MTP)")
    np.testing.assert_allclose(np.array(drafter_logits(lm, PROMPT)), np.array(reference_logits(ref, lm, PROMPT)),
                               atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("family", ["qwen3_5", "deepseek_v3", "deepseek_v41", "nemotron_h"])
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


MULTI = ["mimo", "deepseek_v41", "deepseek_v3", "step3p5"]


@pytest.fixture(scope="module")
def written_multi(tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("mtp3")
    vocab = tiny_lm.config["vocab_size"]
    return {f: (root / f, write_with_mtp(root / f, f, tiny_lm.tokenizer, vocab, seed=3, layers=3)) for f in MULTI}


@pytest.mark.parametrize("family", MULTI)
def test_each_of_several_mtp_layers_matches_the_reference_on_the_layer_before(written_multi, family, tmp_path):
    """Inside the checkpoint, and extracted into a drafter folder (`mtpd drafter extract`)."""
    from daemon.models.checkpoint import extract, inspect

    folder, ref = written_multi[family]
    assert inspect(str(folder))["mtp_layers"] == 3
    extract(str(folder), str(tmp_path / "drafter"))
    for lm in (load(str(folder)), load(str(folder), drafter=str(tmp_path / "drafter"))):
        assert len(mtp_layers(lm.drafter)) == 3
        for ours, theirs in zip(drafter_chain(lm, PROMPT), reference_chain(ref, lm, PROMPT), strict=True):
            np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("family", MULTI)
def test_several_mtp_layers_draft_their_own_positions_in_turn(written_multi, family):
    """Draft j + 1 of a round is layer j's at the last position, each layer having read every
    position as trained (the reference chain), in the first round and after rounds rewound."""
    from mlx_lm.models.cache import make_prompt_cache

    from daemon.drafting.lookup import NgramIndex
    from daemon.drafting.session import DraftingSession
    from daemon.engine.sampling import SamplingParams

    folder, ref = written_multi[family]
    lm = load(str(folder))
    source, cache, ids = lm.drafter.config.source, make_prompt_cache(lm.model), list(PROMPT)
    tap = hidden_tap(lm.model, source)
    logits = lm.model(mx.array([ids]), cache=cache)
    index = NgramIndex()
    index.extend(ids)
    session = DraftingSession(lm.drafter, lm.model, index)
    session.start(tap.hidden(source), mx.argmax(logits[0, -1]).item())
    index.extend([mx.argmax(logits[0, -1]).item()])
    ids = list(index.tokens)
    for _ in range(3):
        drafts = drain(lm.model, session.drafting(3, SamplingParams(), None)).tokens
        chain = reference_chain(ref, lm, ids + drafts[:2])
        assert drafts == [mx.argmax(chain[j][0, len(ids) - 2]).item() for j in range(3)]
        logits = lm.model(mx.array([[ids[-1], drafts[0]]]), cache=cache)  # the target keeps the first draft
        out = [drafts[0], mx.argmax(logits[0, -1]).item()]
        session.rewind(tap.hidden(source), out)
        index.extend(out)
        ids = list(index.tokens)


@pytest.mark.parametrize("family", MULTI)
def test_several_mtp_layers_stay_lossless(written_multi, family):
    lm = load(str(written_multi[family][0]))
    plain = list(generate(lm, Request(PROMPT, max_tokens=24), Fixed(0)))[-1]
    for k in (2, 4):
        spec = list(generate(lm, Request(PROMPT, max_tokens=24), Fixed(k)))[-1]
        assert spec.token_ids == plain.token_ids and all(d > 0 for d in spec.stats.drafted_by_position), k


def test_a_whole_checkpoint_given_as_drafter_is_refused_in_one_line(written):
    with pytest.raises(ValueError, match=r"is not an MTP drafter for this qwen3_5 model \(Received \d+ parameters"):
        load(str(written["qwen3_5"][0]), drafter=str(written["deepseek_v41"][0]))

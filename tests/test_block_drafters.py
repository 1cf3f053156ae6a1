"""Block drafters as released (DFlash, DSpark) on a tiny Qwen3 target: strict loads, logits equal to
an independent reference of the release's forward (tests/blocks.py), one drafter forward per
round, and speculation lossless: greedy to the token, alone and batched, and sampling in distribution."""

import dataclasses
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from blocks import reference_block, reference_markov, reference_taps, write_block_drafter
from families import write_family
from test_batch import run_batch
from test_speculative import TEMPERATURE, VOCAB, assert_joint, exact_joint

from daemon.drafting.block_session import BlockSession
from daemon.drafting.lookup import NgramIndex
from daemon.engine.calibration import shared_estimates
from daemon.engine.forward import hidden_tap
from daemon.engine.generate import generate
from daemon.engine.records import Request
from daemon.engine.rows import drain
from daemon.engine.sampling import SamplingParams
from daemon.models import block
from daemon.models.loading import load
from policies.adaptive import AdaptivePolicy
from policies.fixed import Fixed

PROMPT = (1, 80, 120, 7, 200, 33, 150)
LAYOUTS = {  # name -> write_block_drafter's arguments past the folder, vocab and target depth
    "dflash": dict(kind="dflash", layer_ids=[0, 1], block_size=5),
    "dflash_old_config": dict(kind="dflash", layer_ids=[0, 1], block_size=4, top_level_block=True),
    "dspark": dict(kind="dspark", layer_ids=[-1, 1], block_size=4, markov="vanilla", confidence=True, with_markov=True),
    "dspark_gated": dict(kind="dspark", layer_ids=[0, 1], block_size=3, markov="gated", confidence=True),
    "dspark_rnn": dict(kind="dspark", layer_ids=[-1, 0, 1], block_size=4, markov="rnn"),
    "dspark_plain": dict(kind="dspark", layer_ids=[1], block_size=4),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_lm):
    """The target folder, and each layout's folder with what its reference needs."""
    root = tmp_path_factory.mktemp("blocks")
    vocab = tiny_lm.config["vocab_size"]
    target = write_family(root / "qwen3", "qwen3", tiny_lm.tokenizer, vocab, seed=2)
    refs = {name: (root / name, write_block_drafter(root / name, vocab=vocab, target_layers=2, seed=i, **args))
            for i, (name, args) in enumerate(LAYOUTS.items())}
    return target, refs


def ours(lm, ids, block_tokens):
    """Our drafter on the target's taps over `ids`: all but the last position read, then one block
    forward from the last. Returns (the taps, the proposal rows' logits [P, V], their states [P, H])."""
    source = lm.drafter.config.source
    tap = hidden_tap(lm.model, source)
    lm.model(mx.array([ids]))
    taps = tap.hidden(source)
    caches = lm.drafter.make_cache()
    lm.drafter.read(taps[:, :-1], caches)
    logits, rows = lm.drafter.draft(taps[:, -1:], mx.array([block_tokens]), caches, lm.model)
    return taps, logits, rows[0]


def block_of(ref, token):
    return [token] + [ref["mask"]] * (ref["block_size"] - 1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_block_drafter_loads_strictly_and_matches_the_reference(written, layout):
    target, refs = written
    folder, ref = refs[layout]
    lm = load(str(target), drafter=str(folder))  # strict: every tensor used, none missing
    assert block.is_block(lm.drafter) and lm.drafter.config.kind == ref["kind"]
    taps, logits, _ = ours(lm, PROMPT, block_of(ref, 42))
    np.testing.assert_allclose(np.array(taps), np.array(reference_taps(lm, PROMPT, ref["layer_ids"])), atol=1e-4, rtol=1e-4)
    _, theirs = reference_block(ref, lm, reference_taps(lm, PROMPT, ref["layer_ids"]), block_of(ref, 42))
    assert logits.shape[0] == ref["block_size"] - (ref["kind"] == "dflash")
    np.testing.assert_allclose(np.array(logits), np.array(theirs), atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("layout", ["dspark", "dspark_gated", "dspark_rnn"])
def test_the_markov_head_corrects_each_row_by_the_draft_before_it(written, layout):
    target, refs = written
    folder, ref = refs[layout]
    lm = load(str(target), drafter=str(folder))
    index = NgramIndex()
    index.extend(PROMPT)
    taps = reference_taps(lm, list(PROMPT), ref["layer_ids"])
    session = BlockSession(lm.drafter, lm.model, index)
    session.start(taps, 42)
    drafts = drain(lm.model, session.drafting(8, SamplingParams(), None))
    h, base = reference_block(ref, lm, taps, block_of(ref, 42))
    tokens, _ = reference_markov(ref, base, h, 42)
    assert drafts.tokens == tokens
    assert drafts.tokens != [int(t) for t in mx.argmax(base, axis=-1).tolist()]  # the head changes the drafts here


def test_a_wrong_adapter_fails_the_reference(written, monkeypatch, tmp_path):
    """The reference tests have teeth: the taps fused in the wrong order, the Markov head left
    out, the wrong target layers read."""
    target, refs = written
    folder, ref = refs["dspark"]
    lm = load(str(target), drafter=str(folder))
    taps = reference_taps(lm, list(PROMPT), ref["layer_ids"])
    h, theirs = reference_block(ref, lm, taps, block_of(ref, 42))

    def reversed_fusion(self, hidden):
        return self.hidden_norm(self.fc(mx.concatenate(mx.split(hidden, 2, axis=-1)[::-1], axis=-1)))

    with monkeypatch.context() as m:
        m.setattr(block.BlockDrafter, "context", reversed_fusion)
        assert not np.allclose(np.array(ours(lm, PROMPT, block_of(ref, 42))[1]), np.array(theirs), atol=2e-3, rtol=1e-3)
    with monkeypatch.context() as m:
        m.setattr(block.MarkovHead, "step", lambda self, logits, previous, h, state: (logits, state))
        index = NgramIndex()
        index.extend(PROMPT)
        session = BlockSession(lm.drafter, lm.model, index)
        session.start(taps, 42)
        assert drain(lm.model, session.drafting(8, SamplingParams(), None)).tokens != reference_markov(ref, theirs, h, 42)[0]
    wrong = tmp_path / "wrong"
    shutil.copytree(folder, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "target_layer_ids": [0, 1]}))
    lm = load(str(target), drafter=str(wrong))
    assert not np.allclose(np.array(ours(lm, PROMPT, block_of(ref, 42))[1]), np.array(theirs), atol=2e-3, rtol=1e-3)


def test_inspect_tells_a_block_drafters_kind(written, tmp_path):
    from daemon.models.checkpoint import inspect

    _, refs = written
    report = inspect(str(refs["dspark"][0]))
    assert (report["drafter_kind"], report["block_size"], report["target_layer_ids"]) == ("dspark", 4, [-1, 1])
    assert report["markov_head"] == "vanilla" and report["confidence_head"] and "--drafter DIR" in report["plan"]
    assert inspect(str(refs["dflash"][0]))["block_size"] == 5
    folder = tmp_path / "dflash2"
    shutil.copytree(refs["dflash"][0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["DFlash2DraftModel"]}))
    assert inspect(str(folder))["plan"].startswith("not run: ") and "DFlash2" in inspect(str(folder))["plan"]


def test_a_folder_of_another_layout_is_refused_in_one_line(written, tmp_path):
    target, refs = written
    folder = tmp_path / "wrong"
    shutil.copytree(refs["dspark_gated"][0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "markov_rank": 0}))  # the Markov tensors left over
    with pytest.raises(ValueError, match=r"^\S+ is not a dspark drafter of this layout \(Received 4 parameters not in model\)$"):
        load(str(target), drafter=str(folder))
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["DFlash2DraftModel"]}))
    with pytest.raises(ValueError, match="DFlash2 drafter .* not supported yet"):
        load(str(target), drafter=str(folder))
    (folder / "config.json").write_text(json.dumps({**config, "target_layer_ids": [0, 5]}))
    with pytest.raises(ValueError, match=r"target_layer_ids \[0, 5\] must be increasing target layers"):
        load(str(target), drafter=str(folder))


@pytest.mark.parametrize("layout", ["dflash", "dspark", "dspark_rnn"])
def test_speculation_with_a_block_drafter_is_lossless(written, layout):
    target, refs = written
    lm = load(str(target), drafter=str(refs[layout][0]))
    plain = list(generate(lm, Request(PROMPT, max_tokens=24), Fixed(0)))[-1]
    assert len(plain.token_ids) > 4
    estimates = shared_estimates(lm, None)
    assert estimates.costs.block and estimates.costs.k_max == lm.drafter.config.proposals
    for policy in (Fixed(1), Fixed(3), Fixed(8), AdaptivePolicy(estimates)):
        spec = list(generate(lm, Request(PROMPT, max_tokens=24), policy))[-1]
        assert spec.token_ids == plain.token_ids, policy.name
        assert spec.stats.drafted > 0 or policy.name == "adaptive"
        assert len(spec.stats.drafted_by_position) <= lm.drafter.config.proposals


def test_a_round_runs_one_drafter_forward_for_its_whole_block(written, monkeypatch):
    target, refs = written
    lm = load(str(target), drafter=str(refs["dspark"][0]))
    calls = []
    draft = block.BlockDrafter.draft
    monkeypatch.setattr(block.BlockDrafter, "draft", lambda self, *a, **k: calls.append(1) or draft(self, *a, **k))
    done = list(generate(lm, Request(PROMPT, max_tokens=24), Fixed(4)))[-1]
    rounds = done.stats.drafted_by_position[0]
    assert done.stats.drafted_by_position[3] > 0 and len(calls) == rounds  # 4 drafts a round, one forward each


@pytest.mark.parametrize("spec", ["fixed:3", "adaptive"])
def test_batched_block_drafting_equals_alone(written, spec, monkeypatch):
    """Each sequence drafts what it drafts alone, the blocks of a step in one drafter forward."""
    target, refs = written
    lm = load(str(target), drafter=str(refs["dspark"][0]))
    estimates = shared_estimates(lm, None)
    prompts = [PROMPT, (5, 6, 7, 8, 9, 10), (250, 251, 252, 40, 41)]  # ids inside the tiny vocabulary (267)

    def policy():
        return AdaptivePolicy(estimates) if spec == "adaptive" else Fixed(3)

    requests = [Request(p, max_tokens=16 + 4 * i) for i, p in enumerate(prompts)]
    alone = [list(generate(lm, r, policy()))[-1] for r in requests]
    forwards = []
    call = block.BlockDrafter.__call__
    monkeypatch.setattr(block.BlockDrafter, "__call__", lambda self, hiddens, *a: forwards.append(len(hiddens)) or call(
        self, hiddens, *a))
    batched, reports = run_batch(lm, requests, [policy() for _ in requests], rows=estimates.rows)
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]
    assert max(r.sequences for r in reports) == len(requests)
    if spec == "fixed:3":
        assert [b.stats.accepted_by_position for b in batched] == [a.stats.accepted_by_position for a in alone]
        assert max(forwards) == len(requests) and sum(forwards) == sum(b.stats.drafted_by_position[0] for b in batched)


def test_sampling_with_a_markov_block_keeps_the_targets_distribution(tiny_lm, monkeypatch):
    """q is the block's row after the Markov head's bias from the draft actually drawn before it:
    the answers' joint distribution is the target's (chi-square at p = 0.001)."""
    from doubles import small_vocab

    lm = small_vocab(tiny_lm.tokenizer, VOCAB)
    config = block.BlockConfig(
        target={"num_hidden_layers": 1, "hidden_size": 32}, kind="dspark", hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64, vocab_size=VOCAB,
        rms_norm_eps=1e-5, rope_theta=10000.0, block_size=3, mask_token_id=VOCAB - 1, target_layer_ids=[-1, 0],
        markov_rank=4)
    mx.random.seed(5)
    drafter = block.BlockDrafter(config)
    mx.eval(drafter.parameters())
    lm = dataclasses.replace(lm, drafter=drafter, drafter_name="block")
    monkeypatch.setattr(lm.tokenizer, "_eos_token_ids", set())
    prompt, params, runs = [1, 5, 2], SamplingParams(temperature=TEMPERATURE), 2500
    counts = np.zeros((VOCAB, VOCAB))
    drafted = accepted = 0
    for seed in range(runs):
        done = list(generate(lm, Request(tuple(prompt), max_tokens=3, sampling=dataclasses.replace(params, seed=seed)),
                             Fixed(2)))[-1]
        counts[done.token_ids[1], done.token_ids[2]] += 1
        drafted, accepted = drafted + done.stats.drafted, accepted + done.stats.accepted
    assert_joint(counts, exact_joint(lm.model, prompt, params) * runs, "markov block")
    assert 0 < accepted < drafted  # some drafts kept, some rejected: both paths ran


def test_deepseek_v4_dspark_blocks_are_told_from_an_mtp_layer_by_their_tensors(tiny_lm, tmp_path):
    """V4-Flash-0731's `mtp.*` are DSpark blocks (main_proj, main_norm, a Markov head; no e_proj /
    h_proj), with num_nextn_predict_layers as an MTP checkpoint has it: mtpd serves the model
    plainly and says why, `mtpd inspect` says what they are, extraction is refused in one line."""
    from families import write_with_mtp
    from structlog.testing import capture_logs

    from daemon.models.checkpoint import extract, inspect

    folder = tmp_path / "v4-dspark"
    write_with_mtp(folder, "deepseek_v41", tiny_lm.tokenizer, tiny_lm.config["vocab_size"], seed=1)
    weights = mx.load(str(folder / "model.safetensors"))
    hidden, vocab = 64, tiny_lm.config["vocab_size"]
    mtp_only = ("mtp.0.e_proj", "mtp.0.h_proj", "mtp.0.enorm", "mtp.0.hnorm")
    weights = {k: v for k, v in weights.items() if not k.startswith(mtp_only)}
    weights.update({"mtp.0.main_proj.weight": mx.zeros((hidden, 3 * hidden)), "mtp.0.main_norm.weight": mx.ones((hidden,)),
                    "mtp.0.markov_head.markov_w1.weight": mx.zeros((vocab, 16)),
                    "mtp.0.markov_head.markov_w2.weight": mx.zeros((vocab, 16))})
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(dspark_block_size=5, dspark_target_layer_ids=[0, 1, 2], dspark_markov_rank=16)
    (folder / "config.json").write_text(json.dumps(config))
    with capture_logs() as logs:
        lm = load(str(folder))
    assert lm.drafter is None
    assert any(e["event"] == "drafter unused" and "DSpark blocks" in e["reason"] for e in logs), logs
    plain = list(generate(lm, Request(PROMPT, max_tokens=8), Fixed(0)))[-1]
    assert len(plain.token_ids) == 8
    assert "DSpark blocks" in inspect(str(folder))["plan"]
    with pytest.raises(ValueError, match=r"^\S+: its mtp\.\* tensors are DeepSeek DSpark blocks .* blocks yet$"):
        extract(str(folder), str(tmp_path / "out"))


def test_blocks_drafted_together_equal_each_alone(written):
    from daemon.engine.ragged import run_drafts
    from daemon.engine.rows import DraftCall

    target, refs = written
    lm = load(str(target), drafter=str(refs["dspark_rnn"][0]))
    source, drafter = lm.drafter.config.source, lm.drafter
    tap = hidden_tap(lm.model, source)
    calls, alone = [], []
    for ids in (PROMPT, (5, 6, 7, 8, 9, 10, 11, 12, 13)):
        lm.model(mx.array([ids]))
        taps = tap.hidden(source)
        for out in (calls, alone):
            caches = drafter.make_cache()
            drafter.read(taps[:, :-2], caches)
            out.append(DraftCall(drafter, taps[:, -2:], [ids[-1]] + [refs["dspark_rnn"][1]["mask"]] * 3, caches))
    together = run_drafts(lm.model, calls)
    for (logits, rows), call in zip(together, alone):
        one, one_rows = call.run(lm.model)
        np.testing.assert_allclose(np.array(logits), np.array(one), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(np.array(rows), np.array(one_rows), atol=1e-5, rtol=1e-4)
    assert [c[0].offset for c in (call.cache for call in calls)] == [c[0].offset for c in (call.cache for call in alone)]

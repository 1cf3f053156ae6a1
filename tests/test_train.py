"""Training a drafter for a tiny random model, in seconds."""

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest

from daemon.drafting.lookup import NgramIndex
from daemon.engine.generate import generate
from daemon.engine.records import Request
from daemon.models.loading import load
from daemon.training.data import (
    answer_positions,
    choose_head_vocab,
    context_offers,
    drafter_batch,
)
from daemon.training.loss import fixed_rounds
from daemon.training.settings import TrainSettings, default_feature_layers
from daemon.training.train import train_drafter
from policies.fixed import Fixed

# a quarter held out: enough answer tokens to measure acceptance on; the final hidden state alone
SETTINGS = TrainSettings(tokens=3000, steps=60, chain_steps=20, batch=4, window=64, head_vocab=64, answer_tokens=24,
                         held_out=0.25, feature_layers=(), generate_workers=1, train_workers=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_gguf):
    out = tmp_path_factory.mktemp("drafter")
    lm = load(str(tiny_gguf), drafter="none")
    mx.random.seed(0)  # the drafter's initial weights
    record = train_drafter(lm, out, SETTINGS, progress=lambda _: None)
    return out, record


@pytest.fixture(scope="module")
def trained_with_blocks(tmp_path_factory, tiny_gguf):
    """A drafter that also reads the output of the tiny target's block 0 (of 2)."""
    out = tmp_path_factory.mktemp("drafter-blocks")
    lm = load(str(tiny_gguf), drafter="none")
    mx.random.seed(0)
    record = train_drafter(lm, out, dataclasses.replace(SETTINGS, feature_layers=(0,)), progress=lambda _: None)
    return out, record


@pytest.fixture(scope="module")
def trained_without_offers(tmp_path_factory, tiny_gguf):
    """A drafter that does not read the context lookup's offers (as an MTP model's own does not)."""
    out = tmp_path_factory.mktemp("drafter-no-offers")
    lm = load(str(tiny_gguf), drafter="none")
    mx.random.seed(0)
    record = train_drafter(lm, out, dataclasses.replace(SETTINGS, read_offers=False), progress=lambda _: None)
    return out, record


def test_training_learns_the_targets_choices(trained):
    out, record = trained
    acceptance = record["held_out_first_position_acceptance"]
    assert acceptance["all"] > 0.07  # an untrained head over 64 tokens agrees ~2% of the time (0.12 measured)
    saved = json.loads((out / "training.json").read_text())
    assert saved["steps"] == 80 and saved["head_vocab_size"] == 64
    assert 0 <= saved["held_out_second_position_acceptance"]["all"] <= 1
    assert 0 < saved["head_vocab_coverage_held_out"] <= 1
    with np.load(out / "work" / "features.npz") as f:  # answers start after their prompts; stdlib at 0
        assert 0 < f["starts"].max() < f["lengths"].max() and f["starts"].min() == 0


def test_data_parallel_processes_train_the_drafter(tmp_path, tiny_gguf):
    """Two processes sharing every batch (gradients averaged over mx.distributed's ring on loopback)
    learn as one does; the parent process writes the drafter from their checkpoint."""
    lm = load(str(tiny_gguf), drafter="none")
    mx.random.seed(0)
    lines = []
    record = train_drafter(lm, tmp_path, dataclasses.replace(SETTINGS, train_workers=2), progress=lines.append)
    assert record["held_out_first_position_acceptance"]["all"] > 0.07
    assert record["steps"] == 80 and "step 80/80" in " ".join(lines)
    drafter = load(str(tiny_gguf), drafter=str(tmp_path)).drafter
    assert drafter.config.head_vocab == json.loads((tmp_path / "config.json").read_text())["head_vocab"]


def test_acceptance_counts_answer_tokens_only():
    """Position i drafts token i + 2: with the answer starting at token 3 of 6, positions 1-4 count;
    a sequence without a prompt (standard-library text) counts every position."""

    f = {"hidden": np.zeros((2, 8, 4), np.float16), "tokens": np.zeros((2, 8), np.int32),
         "argmax": np.zeros((2, 8), np.int32), "lengths": np.array([6, 4]), "starts": np.array([3, 0])}
    rows = np.array([0, 1])
    mask = drafter_batch(f, rows)[3] & answer_positions(f, rows, 7)
    assert np.array(mask).tolist() == [
        [False, True, True, True, True, False, False],
        [True, True, True, False, False, False, False],
    ]


def test_fixed_rounds_walk_the_hits_as_a_fixed_run_does():
    """Answer positions 2..11; the first round starts at 3 (the prompt's pass gave the first answer
    token) and each next one after the last accepted draft's bonus token: at 3 it accepts 2 drafts,
    at 6 none, at 7 all three, then 11 leaves no room for a whole round."""
    counted = np.zeros((3, 14), bool)
    counted[:, 2:12] = True
    hits = np.zeros((3, 14), bool)
    hits[:2, 3] = True  # round at 3: drafts 1 and 2 right, 3 wrong
    hits[1:, 6] = True  # round at 6: the first draft wrong, so none accepted
    hits[:, 7] = True  # round at 7: all three
    hits[:, 4:6] = True  # never a round's start: the walk jumps from 3 to 6
    assert fixed_rounds(hits, counted).tolist() == [1, 0, 1, 1]
    assert fixed_rounds(hits, np.zeros_like(counted)).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("which", ["trained", "trained_with_blocks", "trained_without_offers"])
def test_trained_drafter_loads_and_stays_lossless(which, request, tiny_gguf):
    out, record = request.getfixturevalue(which)
    lm = load(str(tiny_gguf), drafter=str(out))
    assert len(lm.drafter.config.head_vocab) == 64
    assert len(lm.phrases) == record["phrasebook_ngrams"] > 0  # from the target's answers, shipped beside it
    messages = [{"role": "user", "content": "Write a function."}]
    prompt = tuple(lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    plain = list(generate(lm, Request(prompt, max_tokens=40), Fixed(0)))[-1]
    spec = list(generate(lm, Request(prompt, max_tokens=40), Fixed(3)))[-1]
    assert spec.token_ids == plain.token_ids
    assert spec.stats.accepted > 0


def test_draft_is_the_last_row_of_a_full_call(trained, tiny_gguf):
    """draft() runs the head on the last position alone; its logits are the full call's last row
    (impossible, -inf, outside the head's vocabulary), and its block output is the same."""

    out, _ = trained
    lm = load(str(tiny_gguf), drafter=str(out))
    width = lm.config["hidden_size"] * (1 + len(lm.drafter.config.feature_layers))
    hidden = mx.random.normal((1, 5, width), key=mx.random.key(0))
    tokens = mx.array([[3, 4, 5, 6, 7]])
    offers = (mx.array([[0, 5, 6, 0, 8]]), mx.array([[0, 2, 4, 0, 3]]))  # it reads them (the default)
    full, own = lm.drafter(hidden, tokens, lm.drafter.make_cache(), lm.model, offers)
    last, own_last = lm.drafter.draft(hidden, tokens, lm.drafter.make_cache(), lm.model, offers)
    assert last.shape == (1, lm.config["vocab_size"])
    assert int(mx.isfinite(last).sum()) == SETTINGS.head_vocab
    np.testing.assert_allclose(np.array(last), np.array(full[:, -1]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(own_last), np.array(own), rtol=1e-5, atol=1e-5)


def test_resume_continues_from_the_checkpoint(tmp_path, tiny_gguf):
    lm = load(str(tiny_gguf), drafter="none")
    lines = []
    train_drafter(lm, tmp_path, dataclasses.replace(SETTINGS, steps=200), progress=lines.append)
    assert (tmp_path / "work" / "ckpt.safetensors").exists()
    record = train_drafter(lm, tmp_path, dataclasses.replace(SETTINGS, steps=200, chain_steps=40), resume=True,
                           progress=lines.append)
    assert "resumed at step 220" in lines and record["steps"] == 240


def test_second_stage_teaches_the_later_depths(tmp_path, tiny_gguf):
    """A first stage alone, then the same run resumed with a three-depth stage: acceptance at draft
    positions 2 and 3 (drafts fed the drafter's own output) rises."""

    mx.random.seed(0)  # the drafter's initial weights
    lm = load(str(tiny_gguf), drafter="none")
    lines = []
    three = dataclasses.replace(SETTINGS, chain_depths=3)
    first = train_drafter(lm, tmp_path, dataclasses.replace(three, chain_steps=0), progress=lines.append)
    both = train_drafter(lm, tmp_path, dataclasses.replace(three, chain_steps=200), resume=True, progress=lines.append)
    assert "resumed at step 60" in lines and both["steps"] == 260
    assert any(line.startswith("step 260: held-out position-3 acceptance") for line in lines)
    for key in ("held_out_second_position_acceptance", "held_out_position_3_acceptance"):
        before, after = first[key]["all"], both[key]["all"]
        assert after > before, (key, before, after)


@pytest.mark.parametrize("which", ["trained", "trained_with_blocks", "trained_without_offers"])
def test_later_depth_rows_equal_chained_drafting(which, request, tiny_gguf):
    """chain_depths' row i at depth d is what draft() gives when the cache holds positions 0..i and
    the chain so far, and the drafter is fed its own block output of depth d - 1 at i (with the block
    features of position i, if it reads any) and token i + d - 1 (with the offer after that token,
    if it reads offers)."""

    from daemon.training.loss import chain_depths

    out, record = request.getfixturevalue(which)
    lm = load(str(tiny_gguf), drafter=str(out))
    d = lm.drafter
    assert d.config.feature_layers == list(record["settings"]["feature_layers"])
    width = lm.config["hidden_size"] * (1 + len(d.config.feature_layers))
    hidden = mx.random.normal((1, 7, width), key=mx.random.key(1))
    tokens = mx.array([[3, 9, 4, 7, 5, 8, 6]])
    offers = (mx.array([[0, 4, 7, 0, 8, 2, 5]]), mx.array([[0, 2, 3, 0, 4, 2, 1]])) if d.config.reads_offers else None

    def at(i, j):
        return offers and tuple(a[:, i:j] for a in offers)

    _, depth2, depth3 = chain_depths(d, lm.model, hidden, tokens, offers, depths=3)
    for i in range(5):
        cache = d.make_cache()
        _, own = d.features(hidden[:, : i + 1], tokens[:, : i + 1], cache, lm.model, at(0, i + 1))
        for depth, expected in ((2, depth2), (3, depth3)):
            j = i + depth - 1
            chained = d.chained(own[:, -1:], hidden[:, i : i + 1])
            out, own = d.features(chained, tokens[:, j : j + 1], cache, lm.model, at(j, j + 1))
            np.testing.assert_allclose(np.array(out[0, 0]), np.array(expected[0, i]), rtol=1e-4, atol=1e-4)


def test_reading_block_features_learns_too(trained_with_blocks):
    out, record = trained_with_blocks
    assert record["held_out_first_position_acceptance"]["all"] > 0.07  # chance: ~2%
    config = json.loads((out / "config.json").read_text())
    assert config["feature_layers"] == [0]
    with np.load(out / "work" / "features.npz") as f:
        assert f["hidden"].shape[-1] == 2 * config["target"]["hidden_size"]


@pytest.mark.parametrize("which", ["trained", "trained_without_offers"])
def test_drafters_learn_with_and_without_the_lookups_offers(which, request):
    out, record = request.getfixturevalue(which)
    assert record["held_out_first_position_acceptance"]["all"] > 0.07  # chance: ~2%
    reads = json.loads((out / "config.json").read_text())["reads_offers"]
    assert reads is (which == "trained") is record["settings"]["read_offers"]


def test_offers_at_a_position_are_the_lookups_after_the_token_it_reads(trained):
    """Drafter position i reads token i + 1 and drafts i + 2: its offer is what the context lookup
    offers after tokens 0..i+1, as serving sees it; zero past the sequence."""
    out, _ = trained
    with np.load(out / "work" / "features.npz") as f:
        f = {k: f[k][:2] for k in f}
    offered, match = context_offers(f, np.array([1]))
    n = int(f["lengths"][1])
    for i in range(n - 1):
        index = NgramIndex()
        index.extend(f["tokens"][1, : i + 2].tolist())
        proposal = index.propose(1)
        assert (offered[0, i], match[0, i]) == ((proposal.tokens[0], proposal.match) if proposal.tokens else (0, 0))
    assert not match[0, n - 1 :].any() and match[0].any()


def test_default_feature_layers_are_a_third_and_two_thirds_up():
    assert default_feature_layers(30) == (9, 19)  # the default model's
    assert default_feature_layers(2) == (0,)  # the tiny test model's, once
    assert default_feature_layers(1) == (0,)


def test_bad_feature_layers_fail_before_any_work(tmp_path, tiny_gguf):
    lm = load(str(tiny_gguf), drafter="none")
    with pytest.raises(ValueError, match="feature_layers"):
        train_drafter(lm, tmp_path, dataclasses.replace(SETTINGS, feature_layers=(5,)), progress=lambda _: None)
    assert not (tmp_path / "work" / "answers.npz").exists()


def test_head_vocabulary_is_the_most_frequent_predictions():

    f = {"argmax": np.array([[5, 5, 5, 7, 7, 9]]), "tokens": np.array([[1, 1, 1, 1, 1, 1]])}
    assert choose_head_vocab(f, 2) == [5, 7]


def test_worker_processes_answer_as_one_process_does(tmp_path, tiny_gguf):
    """Two worker processes take every other batch of prompts; together they give one process's
    answers to the same prompts, and leave a single answers file."""
    from daemon.training.data import make_answers

    lm = load(str(tiny_gguf), drafter="none")
    one_budget = dataclasses.replace(SETTINGS, tokens=1, stdlib_share=0.0)  # a batch per process
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    lines = []
    two = make_answers(lm, dataclasses.replace(one_budget, generate_batch=2, generate_workers=2), lines.append,
                       tmp_path / "two")
    one = make_answers(lm, dataclasses.replace(one_budget, generate_batch=4, generate_workers=1), lambda _: None,
                       tmp_path / "one")
    assert len(two["lengths"]) == 4
    assert two["lengths"].tolist() == one["lengths"].tolist()
    assert two["tokens"].tolist() == one["tokens"].tolist()
    assert two["argmax"].tolist() == one["argmax"].tolist()
    assert np.abs(two["hidden"].astype(np.float32) - one["hidden"].astype(np.float32)).max() < 2e-2
    assert lines[-1].endswith("from 4 prompts (2 worker processes)")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["answers.npz"]


def test_batched_answers_equal_one_by_one_greedy_with_their_hidden_states(tiny_gguf):

    from daemon.engine.forward import hidden_tap
    from daemon.training.batch_greedy import greedy_batch

    lm = load(str(tiny_gguf), drafter="none")
    prompts = [lm.tokenizer.encode(t) for t in ("def add(a, b):", "Once upon a time there was", "2 + 2 =")]
    answered = greedy_batch(lm.model, prompts, 12, set(), "post_norm+0")  # block 0's output too
    for prompt, a in zip(prompts, answered):
        alone = list(generate(lm, Request(tuple(prompt), max_tokens=12), Fixed(0)))[-1]
        assert a.ids == prompt + list(alone.token_ids)
        lm.model(mx.array([a.ids]))
        h = np.array(hidden_tap(lm.model, "post_norm+0").hidden("post_norm+0")[0])
        assert h.shape == (len(a.ids), 2 * lm.config["hidden_size"])
        assert np.abs(a.hidden.astype(np.float32) - h).max() < 2e-2
        assert a.argmax[len(prompt) - 1 : -1].tolist() == list(alone.token_ids)[: len(a.ids) - len(prompt)]


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_train_drafter_rejects_a_bad_worker_count(bad, capsys):
    from daemon.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["train-drafter", "--out", "unused", "--generate-workers", bad])
    assert stop.value.code == 2
    assert f"expected a whole number >= 1, not {bad!r}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_block(tmp_path_factory, tiny_gguf):
    """A block drafter (`--kind block`): blocks of 4 over the tiny target's taps."""
    out = tmp_path_factory.mktemp("drafter-block")
    lm = load(str(tiny_gguf), drafter="none")
    mx.random.seed(0)
    settings = dataclasses.replace(SETTINGS, kind="block", block_size=4, anchors=8, steps=120)
    record = train_drafter(lm, out, settings, progress=lambda _: None)
    return out, record


def test_a_block_drafter_learns_the_targets_choices_and_stays_lossless(trained_block, tiny_gguf):
    from daemon.models.block import is_block

    out, record = trained_block
    acceptance = record["held_out_block_acceptance"]["all"]
    # an untrained head over 64 tokens agrees ~2% of the time (0.29 and 0.32 measured)
    assert acceptance["by_position"][0] > 0.1 and acceptance["accepted_per_block"] > 0.1
    assert len(acceptance["by_position"]) == 4 and json.loads((out / "training.json").read_text())["steps"] == 120
    lm = load(str(tiny_gguf), drafter=str(out))
    assert is_block(lm.drafter) and lm.drafter.config.block_size == 4 and len(lm.drafter.config.head_vocab) == 64
    assert len(lm.phrases) == record["phrasebook_ngrams"] > 0
    messages = [{"role": "user", "content": "Write a function."}]
    prompt = tuple(lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    plain = list(generate(lm, Request(prompt, max_tokens=40), Fixed(0)))[-1]
    spec = list(generate(lm, Request(prompt, max_tokens=40), Fixed(4)))[-1]
    assert spec.token_ids == plain.token_ids and spec.stats.accepted > 0


def test_a_blocks_training_rows_equal_its_drafting(trained_block, tiny_gguf):
    """The teacher-forced form (every anchor's block over the context before it, in one forward)
    gives each block's rows as the drafter gives them when its last token is the anchor's."""
    from daemon.engine.forward import hidden_tap
    from daemon.training.block_loss import block_batch, block_states

    out, _ = trained_block
    lm = load(str(tiny_gguf), drafter=str(out))
    drafter, source = lm.drafter, lm.drafter.config.source
    ids = [3, 40, 7, 90, 11, 52, 8, 33, 61, 5, 19, 27]
    tap = hidden_tap(lm.model, source)
    lm.model(mx.array([ids]))
    taps = np.array(tap.hidden(source)).astype(np.float16)
    f = {"hidden": taps, "tokens": np.array([ids], np.int32), "argmax": np.zeros((1, len(ids)), np.int32),
         "lengths": np.array([len(ids)]), "starts": np.array([2])}
    anchors = np.array([[2, 5, 9]])
    batch = block_batch(f, np.array([0]), anchors, 4, drafter.config.mask_token_id)
    rows = block_states(drafter, lm.model, *batch[:4])
    for n, p in enumerate(anchors[0]):
        caches = drafter.make_cache()
        block = [ids[p]] + [drafter.config.mask_token_id] * 3
        alone = drafter([mx.array(taps[:, :p]).astype(mx.float32)], [block], [caches], lm.model)
        np.testing.assert_allclose(np.array(rows[:, 4 * n : 4 * n + 4]), np.array(alone), atol=1e-4, rtol=1e-3)

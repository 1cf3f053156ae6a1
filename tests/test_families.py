"""Every family mlx-lm runs, mtpd runs: tiny random checkpoints of a dozen families (hybrid, MoE and
nested configs among them) decode plainly through mtpd to the same greedy ids as mlx-lm's own loop."""

import mlx.core as mx
import mlx_lm
import pytest
from families import configs, write_family
from mlx_lm.generate import generate_step

from daemon.engine.generate import generate
from daemon.engine.records import Request
from daemon.models.loading import load
from policies.fixed import Fixed

PROMPT = (1, 80, 120, 7, 200, 33)
FAMILIES = sorted(configs(300))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("families")
    vocab = tiny_lm.config["vocab_size"]
    return {f: write_family(root / f, f, tiny_lm.tokenizer, vocab, seed=1) for f in FAMILIES}


def mlx_lm_greedy(folder, n: int) -> list[int]:
    model, _ = mlx_lm.load(str(folder))
    steps = generate_step(mx.array(PROMPT), model, max_tokens=n)
    return [int(token) for token, _ in steps]


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_decoding_matches_mlx_lm(folders, family):
    lm = load(str(folders[family]))
    assert lm.drafter is None
    done = list(generate(lm, Request(PROMPT, max_tokens=10), Fixed(0)))[-1]
    reference = mlx_lm_greedy(folders[family], 10)
    ids = list(done.token_ids)
    assert ids == reference[: len(ids)]
    assert len(ids) == 10 or reference[len(ids)] in lm.tokenizer.eos_token_ids  # stopped at an EOS only
    assert lm.config["num_hidden_layers"] == len(lm.model.layers)  # also where the config leaves it implicit

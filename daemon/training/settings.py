"""What `mtpd train-drafter` trains and how: its settings and the drafter configuration they give."""

from __future__ import annotations

from dataclasses import dataclass

from daemon.models import mtp
from daemon.models.block import BlockConfig
from daemon.models.loading import LoadedModel

CATEGORIES = ("code", "prose", "math", "stdlib")  # the kind of prompt answered; stdlib: library source, no prompt


@dataclass
class TrainSettings:
    tokens: int = 650_000  # target positions to train on (generated answers and stdlib text)
    steps: int = 1700
    chain_steps: int = 500  # then steps of the loss over chain_depths: the drafter also fed its own output
    chain_depths: int = 4  # draft positions the second stage trains (EAGLE's training-time test)
    chain_weight: float = 1.0  # weight of each later depth's term in those steps
    batch: int = 8
    generate_batch: int = 48  # prompts answered together
    generate_workers: int = 0  # processes answering at once; 0: one per core on the CPU, one on Metal
    train_workers: int = 0  # processes sharing each batch (data-parallel); 0: one per core on the CPU, one on Metal
    window: int = 256  # tokens per training sequence
    learning_rate: float = 1e-3
    head_vocab: int = 8192  # 0: the full vocabulary
    answer_tokens: int = 160  # max tokens of each generated answer (shorter: more prompts per token)
    stdlib_share: float = 0.25  # share of `tokens` taken from the standard library's source
    held_out: float = 0.05
    hidden_source: str = "post_norm"
    # target blocks whose outputs the drafter also reads (EAGLE-3 style); None: default_feature_layers,
    # () : the final hidden state alone
    feature_layers: tuple[int, ...] | None = None
    read_offers: bool = True  # the drafter also reads the context lookup's offer for the token it drafts
    seed: int = 0
    kind: str = "chain"  # "chain": an MTP drafter chained on its own output; "block": a block drafter (DSpark's rows)
    block_size: int = 8  # a block drafter's rows: the drafts one forward proposes
    block_layers: int = 1
    anchors: int = 32  # blocks trained per sequence and step
    block_reads_last: bool = True  # block rows also read the last context row (daemon.models.block: reads_last)


def default_feature_layers(blocks: int) -> tuple[int, ...]:
    """The blocks a third and two thirds of the way up a target of `blocks` blocks (9 and 19 of the
    default model's 30), once each."""
    return tuple(sorted({max(0, blocks // 3 - 1), max(0, 2 * blocks // 3 - 1)}))


def block_layer_ids(blocks: int) -> list[int]:
    """A block drafter's taps: the blocks a third, two thirds and all the way up (9, 19, 29 of 30)."""
    return sorted({max(0, blocks // 3 - 1), max(0, 2 * blocks // 3 - 1), blocks - 1})


def drafter_config(lm: LoadedModel, s: TrainSettings, head_vocab: list[int] | None = None):
    """The configuration of the drafter these settings train (making it checks them): an MTP
    drafter's (daemon.models.mtp.DrafterConfig), or a block drafter's (daemon.models.block)."""
    if s.kind == "block":
        t = lm.config
        return BlockConfig(
            target=t, kind="dspark", hidden_size=t["hidden_size"], num_hidden_layers=s.block_layers,
            num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_key_value_heads"],
            head_dim=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
            intermediate_size=t["intermediate_size"], vocab_size=t["vocab_size"], rms_norm_eps=t["rms_norm_eps"],
            rope_theta=t.get("rope_theta", 10000.0), block_size=s.block_size, mask_token_id=t["vocab_size"] - 1,
            target_layer_ids=block_layer_ids(t["num_hidden_layers"]), reads_last=s.block_reads_last, head_vocab=head_vocab)
    if s.kind != "chain":
        raise ValueError(f"kind must be chain or block, not {s.kind!r}")
    return mtp.DrafterConfig(lm.config, lm.config["num_hidden_layers"], s.hidden_source, head_vocab=head_vocab,
                             feature_layers=list(s.feature_layers), reads_offers=s.read_offers)



"""`mtpd train-drafter`: an MTP drafter for a model that has none, trained against the frozen target.

Self-distillation: the drafter reads the target's own hidden state h_i and the next token t_{i+1},
and learns the target's own greedy choice at position i+1 -- exactly what greedy verification
accepts -- not the raw text. Its head is the target's, restricted to the most frequent predicted
tokens (FR-Spec style), so a draft token costs a fraction of a target step. The steps come in two
stages: depth 1 alone, then depths 1 and 2 together, depth 2 fed the drafter's own block output as
a chained draft is (see `two_depths`).

Stages, each saved under OUT/work so that a stopped run resumes: text -> features -> steps -> export.
The target's answers also become its phrasebook (daemon.drafting.phrases), shipped beside the drafter.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.models.base import create_causal_mask

from daemon.cpu import workers as cpu_workers
from daemon.drafting.lookup import NgramIndex
from daemon.drafting.phrases import Phrasebook
from daemon.engine.forward import hidden_tap
from daemon.models import drafter_io, mtp
from daemon.models.loading import LoadedModel, load
from daemon.models.prompts import encode_chat
from daemon.training.batch_greedy import greedy_batch
from daemon.training.prompts import stdlib_chunks, training_prompts

CATEGORIES = ("code", "prose", "math", "stdlib")  # the kind of prompt answered; stdlib: library source, no prompt


@dataclass
class TrainSettings:
    tokens: int = 200_000  # target positions to train on (generated answers and stdlib text)
    steps: int = 500
    chain_steps: int = 100  # then steps of the two-depth loss: the drafter also fed its own output
    chain_weight: float = 1.0  # weight of the depth-2 term in those steps
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


# --- data --------------------------------------------------------------------------------------


def pack(seqs: list[tuple[str, list[int], np.ndarray, np.ndarray, int]], window: int, width: int) -> dict[str, np.ndarray]:
    """(category, ids, hidden [n, width], argmax [n], where the answer starts in ids) sequences ->
    arrays right-padded to the window."""
    n = len(seqs)
    f = {
        "hidden": np.zeros((n, window, width), np.float16),
        "tokens": np.zeros((n, window), np.int32),
        "argmax": np.zeros((n, window), np.int32),
        "lengths": np.zeros(n, np.int32),
        "category": np.zeros(n, np.int32),
        "starts": np.zeros(n, np.int32),
    }
    for r, (category, ids, hidden, argmax, start) in enumerate(seqs):
        m = min(len(ids), window)
        f["tokens"][r, :m], f["hidden"][r, :m], f["argmax"][r, :m] = ids[:m], hidden[:m], argmax[:m]
        f["lengths"][r], f["category"][r], f["starts"][r] = m, CATEGORIES.index(category), start
    return f


def _concat(parts: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def answer_share(lm: LoadedModel, s: TrainSettings, worker: int, workers: int, partial: Path,
                 report: Callable[[int, int], None]) -> None:
    """Worker `worker` of `workers`: the target's greedy answers to prompt batches worker,
    worker + workers, ... up to its share of the answer budget, with the hidden states and argmaxes
    of the same pass. Saved to `partial` after every batch (and resumed from it); `report(tokens,
    prompts)` after every batch."""
    parts = [dict(np.load(partial))] if partial.exists() else []
    done_prompts = len(parts[0]["lengths"]) if parts else 0
    done = int(parts[0]["lengths"].sum()) if parts else 0
    share = math.ceil(int(s.tokens * (1 - s.stdlib_share)) / workers)
    prompts = training_prompts(s.seed)
    eos = set(lm.tokenizer.eos_token_ids)
    source = drafter_config(lm, s).source
    mine = range(worker * s.generate_batch, len(prompts), workers * s.generate_batch)
    for start in mine[math.ceil(done_prompts / s.generate_batch) :]:  # batches already in `partial` skipped
        if done >= share:
            break
        group = prompts[start : start + s.generate_batch]
        ids = [encode_chat(lm.tokenizer, [{"role": "user", "content": m}])[: s.window // 2] for _, m in group]
        answered = greedy_batch(lm.model, ids, min(s.answer_tokens, s.window - max(map(len, ids))), eos, source)
        packed = [(c, a.ids, a.hidden, a.argmax, len(p)) for (c, _), a, p in zip(group, answered, ids)]
        parts.append(pack(packed, s.window, answered[0].hidden.shape[-1]))
        parts = [_concat(parts)]
        np.savez(partial.with_suffix(".tmp.npz"), **parts[0])
        partial.with_suffix(".tmp.npz").replace(partial)
        done = int(parts[0]["lengths"].sum())
        report(done, len(parts[0]["lengths"]))


def _answer_worker(spec: str, s: TrainSettings, worker: int, workers: int, partial: Path, messages) -> None:
    """A worker process of make_answers: loads the target itself."""
    lm = load(spec, drafter="none")
    answer_share(lm, s, worker, workers, partial, lambda tokens, prompts: messages.put((worker, tokens, prompts)))


def make_answers(lm: LoadedModel, s: TrainSettings, progress: Callable[[str], None], work: Path) -> dict:
    """The target's greedy answers to our prompts (`work/answers.npz`), made by `generate_workers`
    processes at once (daemon.cpu.workers), each keeping its own partial file until all are done."""
    final = work / "answers.npz"
    if final.exists():
        return dict(np.load(final))
    plan = work / "answers.json"  # a resumed run keeps the split it started with
    workers = json.loads(plan.read_text())["workers"] if plan.exists() else cpu_workers.count(s.generate_workers)
    plan.write_text(json.dumps({"workers": workers}))
    partials = [work / f"answers.{k}.npz" for k in range(workers)]
    budget = int(s.tokens * (1 - s.stdlib_share))
    counts: dict[int, tuple[int, int]] = {}

    def report(message: tuple[int, int, int]) -> None:
        worker, tokens, prompts = message
        counts[worker] = (tokens, prompts)
        done, answered = map(sum, zip(*counts.values()))
        progress(f"answers: {done}/{budget} tokens from {answered} prompts ({workers} worker processes)")

    if workers == 1:
        answer_share(lm, s, 0, 1, partials[0], lambda tokens, prompts: report((0, tokens, prompts)))
    else:
        cpu_workers.run(_answer_worker, [(lm.path, s, k, workers, partials[k]) for k in range(workers)], report)
    answers = _concat([dict(np.load(p)) for p in partials if p.exists()])
    np.savez(work / "answers.tmp.npz", **answers)
    (work / "answers.tmp.npz").replace(final)
    for stale in (*partials, plan):
        stale.unlink(missing_ok=True)
    return answers


def stdlib_features(lm: LoadedModel, s: TrainSettings, budget: int, progress) -> dict | None:
    """Teacher-forced target passes over standard-library source: hidden states and argmaxes."""
    texts = []
    for chunk in stdlib_chunks(max(1, budget // 200), seed=s.seed):
        texts.append(lm.tokenizer.encode(chunk)[: s.window])
        budget -= len(texts[-1])
        if budget <= 0:
            break
    if not texts:
        return None
    source = drafter_config(lm, s).source
    tap = hidden_tap(lm.model, source)
    seqs = []
    for start in range(0, len(texts), s.batch):
        rows = texts[start : start + s.batch]
        width = max(map(len, rows))
        logits = lm.model(mx.array([r + [0] * (width - len(r)) for r in rows]))
        best = mx.argmax(logits, axis=-1)
        h = tap.hidden(source).astype(mx.float16)
        mx.eval(best, h)
        seqs += [("stdlib", r, np.array(h[i]), np.array(best[i]), 0) for i, r in enumerate(rows)]
        if (start // s.batch) % 10 == 0:
            progress(f"stdlib: {start + len(rows)}/{len(texts)} sequences")
    return pack(seqs, s.window, seqs[0][2].shape[-1])


def drafter_batch(f: dict, rows: np.ndarray):
    """Inputs and labels at drafter positions i = 0..len-2: (h_i, t_{i+1}) -> argmax_{i+1}."""
    hidden = mx.array(f["hidden"][rows, :-1]).astype(mx.float32)
    tokens = mx.array(f["tokens"][rows, 1:])
    labels = mx.array(f["argmax"][rows, 1:])
    mask = mx.arange(hidden.shape[1])[None] < mx.array(f["lengths"][rows] - 1)[:, None]
    return hidden, tokens, labels, mask


def context_offers(f: dict, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the context lookup offers at drafter positions i = 0..window-2 of `rows` (as serving
    sees it: the offer once token i + 1 was appended, daemon.drafting.lookup.NgramIndex.offers): offered
    tokens and match lengths [len(rows), window - 1], 0 where none."""
    offered = np.zeros((len(rows), f["tokens"].shape[1] - 1), np.int32)
    match = np.zeros_like(offered)
    for r, row in enumerate(rows):
        index = NgramIndex()
        index.extend(f["tokens"][row, : f["lengths"][row]].tolist())
        pairs = np.array(index.offers[1:], np.int32).reshape(-1, 2)
        offered[r, : len(pairs)], match[r, : len(pairs)] = pairs[:, 0], np.minimum(pairs[:, 1], mtp.MATCH_CLASSES - 1)
    return offered, match


def _offer_rows(offers: tuple[np.ndarray, np.ndarray] | None, rows: np.ndarray):
    """The drafter's `offers` argument for training rows from context_offers over every row."""
    return None if offers is None else (mx.array(offers[0][rows]), mx.array(offers[1][rows]))


def answer_positions(f: dict, rows: np.ndarray, width: int) -> mx.array:
    """[len(rows), width]: drafter position i drafts token i + 2 of the sequence; True where that
    token belongs to the answer (from `starts`), not to the prompt."""
    return mx.arange(width)[None] + 2 >= mx.array(f["starts"][rows])[:, None]


def choose_head_vocab(f: dict, size: int) -> list[int]:
    """The `size` tokens the target predicts most often in the training data."""
    counts = np.bincount(f["argmax"][f["tokens"] != 0].ravel(), minlength=1)
    order = np.argsort(-counts, kind="stable")[:size]
    return sorted(int(t) for t in order)


# --- model and training ------------------------------------------------------------------------


def default_feature_layers(blocks: int) -> tuple[int, ...]:
    """The blocks a third and two thirds of the way up a target of `blocks` blocks (9 and 19 of the
    default model's 30), once each."""
    return tuple(sorted({max(0, blocks // 3 - 1), max(0, 2 * blocks // 3 - 1)}))


def drafter_config(lm: LoadedModel, s: TrainSettings, head_vocab: list[int] | None = None) -> mtp.DrafterConfig:
    """The configuration of the drafter these settings train (making it checks them)."""
    return mtp.DrafterConfig(lm.config, lm.config["num_hidden_layers"], s.hidden_source, head_vocab=head_vocab,
                             feature_layers=list(s.feature_layers), reads_offers=s.read_offers)


def init_drafter(lm: LoadedModel, head_vocab: list[int] | None, s: TrainSettings) -> mtp.MTPDrafter:
    """Random eh_proj; the block starts as a copy of the target's last layer and shared_head.norm
    as its final norm, so training starts from the target's own representations."""
    config = drafter_config(lm, s, head_vocab)
    drafter = mtp.MTPDrafter(config)
    drafter.block.update(lm.model.model.layers[-1].parameters())
    norm = lm.model.model.norm
    drafter.shared_head.norm.weight = mx.array(getattr(norm, "norm", norm).weight)
    if s.read_offers:  # it starts blind to the offers (zero weights on them) and learns what they are worth
        width = lm.config["hidden_size"]
        drafter.eh_proj.weight = mx.concatenate([drafter.eh_proj.weight[:, :-width], mx.zeros((width, width))], axis=1)
        drafter.match_embed.weight = mx.zeros_like(drafter.match_embed.weight)
    mx.eval(drafter.parameters())
    return drafter


def subset_labels(labels: mx.array, head_vocab: list[int] | None, vocab: int) -> mx.array:
    """Full-vocabulary ids -> head indices; -1 where the head cannot express the token."""
    if head_vocab is None:
        return labels
    lookup = np.full(vocab, -1, np.int32)
    lookup[head_vocab] = np.arange(len(head_vocab))
    return mx.array(lookup)[labels]


def _cross_entropy(drafter, target, out, labels, mask) -> mx.array:
    logits = drafter.head_logits(out, target)
    valid = mask & (labels >= 0)
    ce = nn.losses.cross_entropy(logits, mx.maximum(labels, 0), reduction="none")
    return (ce * valid).sum() / mx.maximum(valid.sum(), 1)


def loss_fn(drafter, target, hidden, tokens, labels, mask, offers):
    out, _ = drafter.features(hidden, tokens, None, target, offers)
    return _cross_entropy(drafter, target, out, labels, mask)


class _FirstDepth:
    """A stand-in KV cache for a whole-sequence pass that keeps its keys and values."""

    offset = 0

    def update_and_fetch(self, keys, values):
        self.keys, self.values = keys, values
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size=None):
        return create_causal_mask(n) if return_array else "causal"


class _SecondDepth:
    """Row i drafts at depth 2 after position i: as when drafting, it sees the first depth's keys
    up to position i (the drafter's cache of real hidden states) and its own key (position i + 1)."""

    offset = 1

    def __init__(self, first: _FirstDepth):
        self.first = first

    def update_and_fetch(self, keys, values):
        return mx.concatenate([self.first.keys, keys], axis=2), mx.concatenate([self.first.values, values], axis=2)

    def make_mask(self, n: int, return_array: bool = False, window_size=None):
        return mx.concatenate([create_causal_mask(n), mx.eye(n, dtype=mx.bool_)], axis=1)


def _next(x: mx.array) -> mx.array:
    """Depth 2's copy of a per-position array: the next position's, the last repeated (padding)."""
    return mx.concatenate([x[:, 1:], x[:, -1:]], axis=1)


def two_depths(drafter, target, hidden, tokens, offers=None) -> tuple[mx.array, mx.array]:
    """Teacher-forced drafts at depths 1 and 2. Depth 1 at position i reads (h_i, t_{i+1}); depth 2
    reads the drafter's own block output there and t_{i+2} (and the lookup's offer after t_{i+2}),
    as a chained draft does once the first is accepted. Returns the shared_head.norm outputs
    [B, L, H] of both (depth 2's last row has no token and is padding)."""
    first = _FirstDepth()
    out1, own = drafter.features(hidden, tokens, first, target, offers)
    offers2 = None if offers is None else tuple(map(_next, offers))
    out2, _ = drafter.features(drafter.chained(own, hidden), _next(tokens), _SecondDepth(first), target, offers2)
    return out1, out2


def _depth2(labels, mask):
    """Labels and mask of depth 2: those of the next position, none for the last."""
    return _next(labels), mx.concatenate([mask[:, 1:], mx.zeros_like(mask[:, -1:])], axis=1)


def chained_loss_fn(drafter, target, hidden, tokens, labels, mask, offers, weight: float):
    out1, out2 = two_depths(drafter, target, hidden, tokens, offers)
    labels2, mask2 = _depth2(labels, mask)
    return _cross_entropy(drafter, target, out1, labels, mask) + weight * _cross_entropy(drafter, target, out2, labels2, mask2)


def evaluate(drafter, lm, f: dict, rows: np.ndarray, lookup_vocab, batch: int, depth: int = 1) -> dict[str, float]:
    """Teacher-forced top-1 agreement with the target at draft position 1 (depth 2: position 2
    after an accepted first draft), per category, counted where the drafted token belongs to the
    answer (a prompt's tokens are never drafted when serving): on the target's own greedy text
    this is the greedy acceptance rate of that draft."""
    hits = np.zeros(len(CATEGORIES))
    totals = np.zeros(len(CATEGORIES))
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        hidden, tokens, labels, mask = drafter_batch(f, part)
        mask = mask & answer_positions(f, part, mask.shape[1])
        offers = tuple(map(mx.array, context_offers(f, part))) if drafter.config.reads_offers else None
        if depth == 1:
            logits, _ = drafter(hidden, tokens, None, lm.model, offers)
        else:
            logits = drafter._full_vocab(drafter.head_logits(two_depths(drafter, lm.model, hidden, tokens, offers)[1], lm.model))
            labels, mask = _depth2(labels, mask)
        correct = (mx.argmax(logits, axis=-1) == labels) & mask
        mx.eval(correct, mask)
        for row, c, m in zip(part, np.array(correct), np.array(mask)):
            hits[f["category"][row]] += c.sum()
            totals[f["category"][row]] += m.sum()
    result = {name: float(hits[i] / totals[i]) for i, name in enumerate(CATEGORIES) if totals[i]}
    result["all"] = float(hits.sum() / max(totals.sum(), 1))
    return result


def _stage(drafter, s: TrainSettings, second: bool):
    """Optimizer and loss gradient of a stage. First: depth 1, warm-up then cosine decay over
    `steps`. Second (from the first's weights): both depths, a short warm-up to 0.3x the rate and
    cosine decay over `chain_steps`."""
    if second:
        peak, warm = s.learning_rate * 0.3, 20
        schedule = optim.cosine_decay(peak, s.chain_steps, peak * 0.1)
        loss = functools.partial(chained_loss_fn, weight=s.chain_weight)
    else:
        peak, warm = s.learning_rate, 50
        schedule = optim.cosine_decay(peak, s.steps, peak * 0.05)
        loss = loss_fn
    rate = optim.join_schedules([optim.linear_schedule(1e-5, peak, warm), schedule], [warm])
    return optim.AdamW(learning_rate=rate, weight_decay=0.0), nn.value_and_grad(drafter, loss)


def _save_checkpoint(work: Path, drafter, optimizer, step: int, rng_state) -> None:
    """The drafter's weights, the optimizer's state (none at step 0) and the batch sampler's state."""
    mx.save_safetensors(str(work / "ckpt.tmp.safetensors"), dict(tree_flatten(drafter.parameters())))
    (work / "ckpt.tmp.safetensors").replace(work / "ckpt.safetensors")
    if optimizer is not None:
        mx.save_safetensors(str(work / "opt.tmp.safetensors"), dict(tree_flatten(optimizer.state)))
        (work / "opt.tmp.safetensors").replace(work / "opt.safetensors")
    (work / "step.json").write_text(json.dumps({"step": step, "rng": rng_state}))


@dataclass
class _Data:
    """The features and what is derived from them, the same in every process that trains."""

    f: dict
    held: np.ndarray
    train_rows: np.ndarray
    head_vocab: list[int] | None
    rng_state: dict  # the batch sampler's, after the split

    @classmethod
    def load(cls, work: Path, s: TrainSettings) -> _Data:
        f = dict(np.load(work / "features.npz"))
        rng = np.random.default_rng(s.seed)
        order = rng.permutation(len(f["lengths"]))
        n_held = max(1, int(len(order) * s.held_out))
        held, train_rows = order[:n_held], order[n_held:]
        head_vocab = choose_head_vocab({k: f[k][train_rows] for k in ("argmax", "tokens")}, s.head_vocab) if s.head_vocab else None
        return cls(f, held, train_rows, head_vocab, rng.bit_generator.state)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _train_worker(spec: str, s: TrainSettings, work: Path, rank: int, hostfile: Path, messages) -> None:
    """A process of a data-parallel run (daemon.cpu.workers): a share of every batch's rows, gradients
    averaged over the group by mx.distributed's ring backend on loopback; rank 0 reports."""
    os.environ.update(MLX_HOSTFILE=str(hostfile), MLX_RANK=str(rank))
    group = mx.distributed.init(backend="ring", strict=True)
    lm = load(spec, drafter="none")
    data = _Data.load(work, s)
    drafter = init_drafter(lm, data.head_vocab, s)  # its weights come from the checkpoint
    _train_steps(lm, drafter, data, s, work, messages.put if rank == 0 else lambda _: None, group)


def _train_steps(lm: LoadedModel, drafter, data: _Data, s: TrainSettings, work: Path, progress: Callable[[str], None],
                 group=None) -> None:
    """From the checkpoint in `work` to the last step, checkpointing every 100 steps. With `group`
    (mx.distributed), this process takes its share of every batch's rows, the gradients are averaged
    over the group, and rank 0 alone evaluates, checkpoints and reports."""
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)
    f, held, head_vocab = data.f, data.held, data.head_vocab
    offers = context_offers(f, np.arange(len(f["lengths"]))) if s.read_offers else None
    saved = json.loads((work / "step.json").read_text())
    drafter.load_weights(str(work / "ckpt.safetensors"))
    step = saved["step"]
    rng = np.random.default_rng()
    rng.bit_generator.state = saved["rng"]
    second = step >= s.steps
    optimizer, value_and_grad = _stage(drafter, s, second)
    if step not in (0, s.steps):  # at the boundary the saved state is the first stage's
        optimizer.state = tree_unflatten(list(mx.load(str(work / "opt.safetensors")).items()))

    vocab = lm.config["vocab_size"]
    total = s.steps + s.chain_steps
    tokens_seen = 0
    t0 = time.perf_counter()
    losses = []
    while step < total:
        if step == s.steps and not second:
            second = True
            optimizer, value_and_grad = _stage(drafter, s, second)
        rows = rng.choice(data.train_rows, size=s.batch, replace=False)
        mine = rows[rank::size]
        hidden, tokens, labels, mask = drafter_batch(f, mine)
        loss, grads = value_and_grad(drafter, lm.model, hidden, tokens, subset_labels(labels, head_vocab, vocab), mask,
                                     _offer_rows(offers, mine))
        if group is not None:
            loss, grads = tree_map(lambda g: mx.distributed.all_sum(g, group=group) / size, (loss, grads))
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(drafter, grads)
        mx.eval(loss, drafter.parameters(), optimizer.state)
        losses.append(loss.item())
        step += 1
        tokens_seen += int((f["lengths"][rows] - 1).sum())
        stage_end = total if second else s.steps
        if rank != 0:
            continue
        if step % 25 == 0 or step == stage_end:
            rate = tokens_seen / (time.perf_counter() - t0)
            progress(f"step {step}/{total} loss {np.mean(losses[-25:]):.3f} ({rate:.0f} tok/s)")
        if step % 100 == 0 or step == stage_end:
            accept = evaluate(drafter, lm, f, held, head_vocab, s.batch)
            progress(f"step {step}: held-out first-position acceptance {_fmt(accept)}")
            if second:
                accept = evaluate(drafter, lm, f, held, head_vocab, s.batch, depth=2)
                progress(f"step {step}: held-out second-position acceptance (after an accepted first) {_fmt(accept)}")
            _save_checkpoint(work, drafter, optimizer, step, rng.bit_generator.state)


def train_drafter(
    lm: LoadedModel, out: Path, s: TrainSettings, resume: bool = False, progress: Callable[[str], None] = print
) -> dict:
    """Runs (or resumes) every stage and writes the drafter folder `out`. Returns the record.
    The steps run in `train_workers` processes at once (data-parallel) or in this one."""
    started = time.perf_counter()
    if s.feature_layers is None:
        s = replace(s, feature_layers=default_feature_layers(lm.config["num_hidden_layers"]))
    drafter_config(lm, s)  # bad settings fail now, not after the data
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    if not resume:
        for stale in work.iterdir():
            stale.unlink()
    feature_file = work / "features.npz"
    if not feature_file.exists():
        answers = make_answers(lm, s, progress, work)
        stdlib = stdlib_features(lm, s, s.tokens - int(answers["lengths"].sum()), progress)
        np.savez(work / "features.tmp.npz", **(_concat([answers, stdlib]) if stdlib else answers))
        (work / "features.tmp.npz").replace(feature_file)
    with np.load(work / "answers.npz") as answers:
        phrases = Phrasebook.build(t[:n] for t, n in zip(answers["tokens"].tolist(), answers["lengths"].tolist()))
    progress(f"phrasebook: {len(phrases)} n-grams from the target's answers")
    data_seconds = time.perf_counter() - started

    data = _Data.load(work, s)
    f, held, train_rows, head_vocab = data.f, data.held, data.train_rows, data.head_vocab
    coverage = _coverage(f, held, head_vocab)
    drafter = init_drafter(lm, head_vocab, s)
    if (work / "step.json").exists():
        progress(f"resumed at step {json.loads((work / 'step.json').read_text())['step']}")
    else:
        _save_checkpoint(work, drafter, None, 0, data.rng_state)
    workers = min(cpu_workers.count(s.train_workers), s.batch)
    if workers == 1:
        _train_steps(lm, drafter, data, s, work, progress)
    else:
        hostfile = work / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in _free_ports(workers)]))
        cpu_workers.run(_train_worker, [(lm.path, s, work, rank, hostfile) for rank in range(workers)], progress)
        drafter.load_weights(str(work / "ckpt.safetensors"))
    step = json.loads((work / "step.json").read_text())["step"]

    acceptance = evaluate(drafter, lm, f, held, head_vocab, s.batch)
    record = {
        "target": lm.name,
        "settings": asdict(s),
        "steps": step,
        "train_sequences": int(len(train_rows)),
        "held_out_sequences": int(len(held)),
        "train_tokens": int(f["lengths"][train_rows].sum()),
        "data": "the target's greedy answers to generated prompts (code, prose, explanations, chat, math "
        "word problems) and Python standard-library source; no benchmark sets",
        "head_vocab_size": len(head_vocab) if head_vocab else lm.config["vocab_size"],
        "head_vocab_coverage_held_out": coverage,
        "phrasebook_ngrams": len(phrases),
        "acceptance_counts": "teacher-forced drafts of answer tokens (the prompt's are never drafted)",
        "held_out_first_position_acceptance": acceptance,
        "held_out_second_position_acceptance": evaluate(drafter, lm, f, held, head_vocab, s.batch, depth=2),
        "data_seconds": round(data_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    export(drafter, phrases, out, record)
    return record


def export(drafter, phrases: Phrasebook, out: Path, record: dict) -> None:
    """The drafter folder: fp16 weights (half the size; the loader casts back on a CPU) and the
    target's phrasebook."""
    drafter.update(tree_unflatten([(k, v.astype(mx.float16)) for k, v in tree_flatten(drafter.parameters())]))
    drafter_io.save(drafter, out)
    phrases.save(out)
    (out / "training.json").write_text(json.dumps(record, indent=1))


def _coverage(f, rows, head_vocab) -> float | None:
    if head_vocab is None:
        return None
    labels = np.concatenate([f["argmax"][r, 1 : f["lengths"][r]] for r in rows])
    return float(np.isin(labels, head_vocab).mean())


def _fmt(accept: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in accept.items())


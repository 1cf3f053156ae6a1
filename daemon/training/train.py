"""`mtpd train-drafter`: an MTP drafter for a model that has none, trained against the frozen target.

Self-distillation: the drafter reads the target's own hidden state h_i and the next token t_{i+1},
and learns the target's own greedy choice at position i+1 -- exactly what greedy verification
accepts -- not the raw text. Its head is the target's, restricted to the most frequent predicted
tokens (FR-Spec style), so a draft token costs a fraction of a target step. The steps come in two
stages: depth 1 alone, then depths 1 .. chain_depths together, each later depth fed the drafter's
own block output as a chained draft is (see `chain_depths`).

Stages, each saved under OUT/work so that a stopped run resumes: text -> features -> steps -> export.
The target's answers also become its phrasebook (daemon.drafting.phrases), shipped beside the drafter.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from daemon.cluster.hosts import loopback_ring
from daemon.cluster.launch import join_ring
from daemon.cpu import workers as cpu_workers
from daemon.drafting.phrases import Phrasebook
from daemon.models import block_io, drafter_io, mtp
from daemon.models.block import BlockDrafter
from daemon.models.loading import LoadedModel, load
from daemon.training.block_loss import block_batch, block_loss_fn, draw_anchors, evaluate_blocks
from daemon.training.data import (
    TrainingData,
    concat,
    context_offers,
    drafter_batch,
    head_coverage,
    make_answers,
    offer_rows,
    stdlib_features,
)
from daemon.training.loss import chained_loss_fn, evaluate, loss_fn, subset_labels
from daemon.training.settings import (
    TrainSettings,
    default_feature_layers,
    drafter_config,
)


def init_drafter(lm: LoadedModel, head_vocab: list[int] | None, s: TrainSettings):
    """Random eh_proj; the block starts as a copy of the target's last layer and shared_head.norm
    as its final norm, so training starts from the target's own representations. A block drafter:
    random fc, its layers copies of the target's last (the names they share), the target's final norm."""
    config = drafter_config(lm, s, head_vocab)
    last = lm.model.model.layers[-1].parameters()
    norm = lm.model.model.norm
    final_norm = mx.array(getattr(norm, "norm", norm).weight)
    if s.kind == "block":
        drafter = BlockDrafter(config)
        shared = dict(tree_flatten(last))
        for layer in drafter.layers:
            layer.load_weights([(k, shared[k]) for k, _ in tree_flatten(layer.parameters()) if k in shared], strict=False)
        drafter.norm.weight = final_norm
        mx.eval(drafter.parameters())
        return drafter
    drafter = mtp.MTPDrafter(config)
    drafter.block.update(last)
    drafter.shared_head.norm.weight = final_norm
    if s.read_offers:  # it starts blind to the offers (zero weights on them) and learns what they are worth
        width = lm.config["hidden_size"]
        drafter.eh_proj.weight = mx.concatenate([drafter.eh_proj.weight[:, :-width], mx.zeros((width, width))], axis=1)
        drafter.match_embed.weight = mx.zeros_like(drafter.match_embed.weight)
    mx.eval(drafter.parameters())
    return drafter


def _stage(drafter, s: TrainSettings, second: bool):
    """Optimizer and loss gradient of a stage. First: depth 1 (a block drafter: its blocks), warm-up
    then cosine decay over `steps`. Second (from the first's weights): `chain_depths` depths, a short warm-up to 0.3x the rate and
    cosine decay over `chain_steps`."""
    if second:
        peak, warm = s.learning_rate * 0.3, 20
        schedule = optim.cosine_decay(peak, s.chain_steps, peak * 0.1)
        loss = functools.partial(chained_loss_fn, weight=s.chain_weight, depths=s.chain_depths)
    else:  # a block drafter has this stage alone
        peak, warm = s.learning_rate, 50
        schedule = optim.cosine_decay(peak, s.steps, peak * 0.05)
        loss = block_loss_fn if s.kind == "block" else loss_fn
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


def _train_worker(spec: str, s: TrainSettings, work: Path, rank: int, ring: list[list[str]], messages) -> None:
    """A process of a data-parallel run (daemon.cpu.workers): a share of every batch's rows, gradients
    averaged over the group by mx.distributed's ring backend on loopback; rank 0 reports."""
    group = join_ring(ring, rank)
    lm = load(spec, drafter="none")
    data = TrainingData.load(work, s)
    drafter = init_drafter(lm, data.head_vocab, s)  # its weights come from the checkpoint
    _train_steps(lm, drafter, data, s, work, messages.put if rank == 0 else lambda _: None, group)


def _train_steps(lm: LoadedModel, drafter, data: TrainingData, s: TrainSettings, work: Path, progress: Callable[[str], None],
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
    second = s.kind == "chain" and step >= s.steps
    optimizer, value_and_grad = _stage(drafter, s, second)
    if step not in (0, s.steps):  # at the boundary the saved state is the first stage's
        optimizer.state = tree_unflatten(list(mx.load(str(work / "opt.safetensors")).items()))

    vocab = lm.config["vocab_size"]
    total = s.steps + (s.chain_steps if s.kind == "chain" else 0)
    tokens_seen = 0
    t0 = time.perf_counter()
    losses = []
    while step < total:
        if step == s.steps and not second:
            second = True
            optimizer, value_and_grad = _stage(drafter, s, second)
        rows = rng.choice(data.train_rows, size=s.batch, replace=False)
        mine = rows[rank::size]
        if s.kind == "block":
            *inputs, labels, counts = block_batch(f, mine, draw_anchors(f, mine, s.anchors, rng), s.block_size,
                                                  drafter.config.mask_token_id)
            loss, grads = value_and_grad(drafter, lm.model, *inputs, subset_labels(labels, head_vocab, vocab), counts)
        else:
            hidden, tokens, labels, mask = drafter_batch(f, mine)
            loss, grads = value_and_grad(drafter, lm.model, hidden, tokens, subset_labels(labels, head_vocab, vocab),
                                         mask, offer_rows(offers, mine))
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
        if s.kind == "block" and (step % 100 == 0 or step == stage_end):
            progress(f"step {step}: held-out acceptance {json.dumps(evaluate_blocks(drafter, lm, f, held, s.batch))}")
            _save_checkpoint(work, drafter, optimizer, step, rng.bit_generator.state)
        elif step % 100 == 0 or step == stage_end:
            first, *later = evaluate(drafter, lm, f, held, s.batch, s.chain_depths if second else 1)
            progress(f"step {step}: held-out first-position acceptance {_fmt(first)}")
            for depth, accept in enumerate(later, 2):
                progress(f"step {step}: held-out position-{depth} acceptance (after accepted earlier ones) {_fmt(accept)}")
            _save_checkpoint(work, drafter, optimizer, step, rng.bit_generator.state)


def _make_data(lm: LoadedModel, s: TrainSettings, work: Path, progress: Callable[[str], None]) -> Phrasebook:
    """The features file (answers, then library text) unless it exists; the phrasebook of the answers."""
    feature_file = work / "features.npz"
    if not feature_file.exists():
        answers = make_answers(lm, s, progress, work)
        stdlib = stdlib_features(lm, s, s.tokens - int(answers["lengths"].sum()), progress)
        np.savez(work / "features.tmp.npz", **(concat([answers, stdlib]) if stdlib else answers))
        (work / "features.tmp.npz").replace(feature_file)
    with np.load(work / "answers.npz") as answers:
        phrases = Phrasebook.build(t[:n] for t, n in zip(answers["tokens"].tolist(), answers["lengths"].tolist()))
    progress(f"phrasebook: {len(phrases)} n-grams from the target's answers")
    return phrases


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
    phrases = _make_data(lm, s, work, progress)
    data_seconds = time.perf_counter() - started

    data = TrainingData.load(work, s)
    f, held, train_rows, head_vocab = data.f, data.held, data.train_rows, data.head_vocab
    coverage = head_coverage(f, held, head_vocab)
    drafter = init_drafter(lm, head_vocab, s)
    if (work / "step.json").exists():
        progress(f"resumed at step {json.loads((work / 'step.json').read_text())['step']}")
    else:
        _save_checkpoint(work, drafter, None, 0, data.rng_state)
    workers = min(cpu_workers.count(s.train_workers), s.batch)
    if workers == 1:
        _train_steps(lm, drafter, data, s, work, progress)
    else:
        ring = loopback_ring(workers)
        cpu_workers.run(_train_worker, [(lm.path, s, work, rank, ring) for rank in range(workers)], progress)
        drafter.load_weights(str(work / "ckpt.safetensors"))
    step = json.loads((work / "step.json").read_text())["step"]

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
        **_acceptance(drafter, lm, data, s),
        "data_seconds": round(data_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    export(drafter, phrases, out, record)
    return record


def _acceptance(drafter, lm: LoadedModel, data: TrainingData, s: TrainSettings) -> dict:
    """The record's held-out acceptance: a block drafter's per row and per block, a chained one's per depth."""
    f, held = data.f, data.held
    if s.kind == "block":
        return {"held_out_block_acceptance": evaluate_blocks(drafter, lm, f, held, s.batch)}
    first, second, *later = evaluate(drafter, lm, f, held, s.batch, max(s.chain_depths, 2))
    return {
        "held_out_first_position_acceptance": first,
        "held_out_second_position_acceptance": second,
        **{f"held_out_position_{d}_acceptance": accept for d, accept in enumerate(later, 3)},
    }


def export(drafter, phrases: Phrasebook, out: Path, record: dict) -> None:
    """The drafter folder: fp16 weights (half the size; the loader casts back on a CPU) and the
    target's phrasebook."""
    drafter.update(tree_unflatten([(k, v.astype(mx.float16)) for k, v in tree_flatten(drafter.parameters())]))
    if isinstance(drafter, BlockDrafter):
        block_io.save(drafter, out)
    else:
        drafter_io.save(drafter, out)
    phrases.save(out)
    (out / "training.json").write_text(json.dumps(record, indent=1))


def _fmt(accept: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in accept.items())


"""Training data: the target's greedy answers to our prompts (made by worker processes) and
standard-library text, with the hidden states and argmaxes of the same pass, packed per sequence;
batches, the lookup's offers and the head vocabulary derived from them."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from daemon.cpu import workers as cpu_workers
from daemon.drafting.lookup import NgramIndex
from daemon.engine.forward import hidden_tap
from daemon.models import mtp
from daemon.models.loading import LoadedModel, load
from daemon.models.prompts import encode_chat
from daemon.training.batch_greedy import greedy_batch
from daemon.training.prompts import stdlib_chunks, training_prompts
from daemon.training.settings import CATEGORIES, TrainSettings, drafter_config


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


def concat(parts: list[dict]) -> dict[str, np.ndarray]:
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
        parts = [concat(parts)]
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
    answers = concat([dict(np.load(p)) for p in partials if p.exists()])
    if (made := int(answers["lengths"].sum())) < budget:
        progress(f"answers: the training prompts ran out at {made} of {budget} tokens")
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


def offer_rows(offers: tuple[np.ndarray, np.ndarray] | None, rows: np.ndarray):
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


@dataclass
class TrainingData:
    """The features and what is derived from them, the same in every process that trains."""

    f: dict
    held: np.ndarray
    train_rows: np.ndarray
    head_vocab: list[int] | None
    rng_state: dict  # the batch sampler's, after the split

    @classmethod
    def load(cls, work: Path, s: TrainSettings) -> TrainingData:
        f = dict(np.load(work / "features.npz"))
        rng = np.random.default_rng(s.seed)
        order = rng.permutation(len(f["lengths"]))
        n_held = max(1, int(len(order) * s.held_out))
        held, train_rows = order[:n_held], order[n_held:]
        head_vocab = None
        if s.head_vocab:
            head_vocab = choose_head_vocab({k: f[k][train_rows] for k in ("argmax", "tokens")}, s.head_vocab)
        return cls(f, held, train_rows, head_vocab, rng.bit_generator.state)


def head_coverage(f, rows, head_vocab) -> float | None:
    if head_vocab is None:
        return None
    labels = np.concatenate([f["argmax"][r, 1 : f["lengths"][r]] for r in rows])
    return float(np.isin(labels, head_vocab).mean())



"""Greedy answers to many prompts at once, keeping what drafter training needs from the same pass.

One left-padded batch (mlx-lm's BatchKVCache), one forward per generated token. Every position's
hidden state and argmax are kept as the answer is written, so the training data costs a single
target pass per token instead of a generation pass and then a feature pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache

from daemon.engine.forward import hidden_tap


@dataclass
class Answered:
    ids: list[int]  # prompt + answer (a final EOS left out)
    hidden: np.ndarray  # [len(ids), H] fp16: the target's hidden state at every position
    argmax: np.ndarray  # [len(ids)] the target's greedy choice after every position


def greedy_batch(model, prompts: list[list[int]], max_tokens: int, eos: set[int], source: str) -> list[Answered]:
    tap = hidden_tap(model, source)
    pad = [max(map(len, prompts)) - len(p) for p in prompts]
    x = mx.array([[0] * n + list(p) for n, p in zip(pad, prompts)])
    cache = [BatchKVCache(pad) for _ in range(len(model.layers))]
    logits = model(x, cache=cache)
    best = mx.argmax(logits, axis=-1)
    hidden = tap.hidden(source).astype(mx.float16)
    mx.eval(best, hidden)
    hidden_parts, best_parts = [np.array(hidden)], [np.array(best)]
    answers = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for _ in range(max_tokens):
        token = best_parts[-1][:, -1]
        for row, t in enumerate(token):
            if not done[row]:
                done[row] = int(t) in eos
                if not done[row]:
                    answers[row].append(int(t))
        if done.all():
            break
        logits = model(mx.array(token)[:, None], cache=cache)
        best = mx.argmax(logits, axis=-1)
        hidden = tap.hidden(source).astype(mx.float16)
        mx.eval(best, hidden)
        hidden_parts.append(np.array(hidden))
        best_parts.append(np.array(best))
    hidden_all = np.concatenate(hidden_parts, axis=1)
    best_all = np.concatenate(best_parts, axis=1)
    out = []
    for row, (n, prompt) in enumerate(zip(pad, prompts)):
        ids = list(prompt) + answers[row]
        out.append(Answered(ids, hidden_all[row, n : n + len(ids)], best_all[row, n : n + len(ids)]))
    return out

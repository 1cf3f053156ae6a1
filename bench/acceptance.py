"""Teacher-forced greedy acceptance of a drafter on the target's own answers to bench/prompts.jsonl.

    python bench/acceptance.py [DRAFTER_FOLDER] [--max-tokens N] [--positions D] [--json FILE]

The target answers every prompt greedily (batched); the drafter then drafts at every answer
position from the target's real hidden states, as `train-drafter` measures its held-out split:
position 1, and each position d <= D after accepted drafts at the positions before it (chained on
its own output). Then the same hits walked as a `fixed:D` run walks them (each round after the
one before it's bonus token): accepted / drafted by position and accepted drafts per round, what
`mtpd bench --spec fixed:D` reports without timing the target. Without a folder: the shipped drafter.
"""

import argparse
import json
import sys
from pathlib import Path

from daemon.cpu.blas import reexec_with_blas

PROMPTS = Path(__file__).with_name("prompts.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("drafter", nargs="?", default=None)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--positions", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    reexec_with_blas(sys.argv)

    import numpy as np

    from daemon.models.loading import load
    from daemon.models.prompts import encode_chat
    from daemon.training.batch_greedy import greedy_batch
    from daemon.training.data import pack
    from daemon.training.loss import draft_hits, fixed_rounds

    lm = load(None, drafter=args.drafter)
    drafter = lm.drafter
    prompts = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    eos = set(lm.tokenizer.eos_token_ids)
    seqs = []
    for start in range(0, len(prompts), 8):
        ids = [encode_chat(lm.tokenizer, p["messages"]) for p in prompts[start : start + 8]]
        answered = greedy_batch(lm.model, ids, args.max_tokens, eos, drafter.config.source)
        seqs += [("code", a.ids, a.hidden, a.argmax, len(i)) for a, i in zip(answered, ids)]
    f = pack(seqs, max(len(s[1]) for s in seqs), seqs[0][2].shape[-1])
    hits, counted = zip(*(draft_hits(drafter, lm, f, np.arange(b, min(b + 8, len(seqs))), args.positions)
                          for b in range(0, len(seqs), 8)))
    hits, counted = np.concatenate(hits), np.concatenate(counted)
    categories = sorted({p["category"] for p in prompts})
    groups = {c: np.array([i for i, p in enumerate(prompts) if p["category"] == c]) for c in categories}
    groups["all"] = np.arange(len(prompts))
    rounds = {c: sum(fixed_rounds(hits[i], counted[i]) for i in rows) for c, rows in groups.items()}
    report = {
        "drafter": args.drafter or "shipped",
        "max_tokens": args.max_tokens,
        "by_position": {  # position d: after accepted drafts at the positions before it
            str(d): {c: round(hits[rows, d - 1].sum() / counted[rows, d - 1].sum(), 4) for c, rows in groups.items()}
            for d in range(1, args.positions + 1)
        },
        f"fixed:{args.positions}": {  # accepted / drafted at each position, and per round
            c: {"by_position": [round(r[d:].sum() / r.sum(), 4) for d in range(1, args.positions + 1)],
                "accepted_per_round": round(float(r @ np.arange(len(r)) / r.sum()), 3), "rounds": int(r.sum())}
            for c, r in rounds.items()
        },
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

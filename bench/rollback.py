"""Taking a rejected draft back on a hybrid model: snapshot and replay (what mtpd does) against
keeping the recurrent state at every verified position, had by running the k + 1 rows one at a
time (the way to get per-position states without kernels of our own).

A random Qwen3.5 text model (Gated DeltaNet and attention layers, 3:1) at a width where the forward
is not all overhead; each round restores the cache first, so every measurement starts from the
same context. Interleaved, fastest of the repeats:

    .venv/bin/python bench/rollback.py --json bench/results/rollback.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

CONFIG = dict(model_type="qwen3_5", tie_word_embeddings=False, text_config=dict(
    model_type="qwen3_5_text", vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=2, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=4096,
    tie_word_embeddings=False, linear_num_value_heads=16, linear_num_key_heads=8, linear_key_head_dim=64,
    linear_value_head_dim=64, linear_conv_kernel_dim=4, full_attention_interval=4,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                     "mrope_section": [11, 11, 10]}))


def main(json_out: Path, context: int, repeats: int) -> None:
    import mlx.core as mx
    from families import random_model
    from mlx_lm.models.cache import make_prompt_cache

    from daemon.engine.rollback import keep_states, restore, take_back

    model = random_model(CONFIG, seed=0, scale=0.02)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[(i * 37) % 2000 + 5 for i in range(context)]]), cache=cache))
    base = keep_states(cache)
    trimmed = [c for c, s in zip(cache, base) if s is None]

    def reset():
        for c in trimmed:
            c.trim(c.offset - context)
        restore(cache, base)

    def replayed(k: int, keep: int):
        reset()
        fed = list(range(10, 11 + k))
        states = keep_states(cache)
        mx.eval(model(mx.array([fed]), cache=cache))
        take_back(model, cache, states, fed, keep)

    def stepped(k: int):
        reset()
        for t in range(10, 11 + k):
            mx.eval(model(mx.array([[t]]), cache=cache))
            keep_states(cache)  # the state at this position, kept

    arms = {}
    for k in range(1, 5):
        arms[f"replay k={k} all kept"] = lambda k=k: replayed(k, k + 1)
        arms[f"replay k={k} first rejected"] = lambda k=k: replayed(k, 1)
        arms[f"replay k={k} last rejected"] = lambda k=k: replayed(k, k)
        arms[f"stepped k={k}"] = lambda k=k: stepped(k)
    for run in arms.values():
        run()  # warm-up
    best = {name: float("inf") for name in arms}
    for _ in range(repeats):  # interleaved
        for name, run in arms.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    rows = []
    for k in range(1, 5):
        no_reject = best[f"replay k={k} all kept"]
        row = {"k": k, "stepped_vs_replay_all_kept": best[f"stepped k={k}"] / no_reject,
               "stepped_vs_replay_first_rejected": best[f"stepped k={k}"] / best[f"replay k={k} first rejected"],
               "stepped_vs_replay_last_rejected": best[f"stepped k={k}"] / best[f"replay k={k} last rejected"],
               "replay_cost_last_rejected": best[f"replay k={k} last rejected"] / no_reject - 1}
        rows.append(row)
        print(f"k={k}: stepping costs x{row['stepped_vs_replay_all_kept']:.2f} of one verification with nothing "
              f"rejected, x{row['stepped_vs_replay_last_rejected']:.2f} of one whose last draft is rejected "
              f"(the replay adds {row['replay_cost_last_rejected']:.0%} there)")
    json_out.write_text(json.dumps({"config": CONFIG, "context": context, "repeats": repeats,
                                    "seconds": best, "ratios": rows}, indent=1))


if __name__ == "__main__":
    from daemon.cpu.blas import reexec_with_blas

    reexec_with_blas(sys.argv)
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    main(args.json, args.context, args.repeats)

#!/usr/bin/env bash
# Reproduces the README's headline table and the figures in docs/benchmarks.md and bench/results/HISTORY.md
# (a few hours on 2 cores).
# Each run is interleaved (A B A B ...); quote ratios from within one run.
set -euo pipefail
cd "$(dirname "$0")/.."
mtpd=.venv/bin/mtpd
out=bench/results
prompts=bench/prompts.jsonl
mkdir -p "$out"
export MTPD_CACHE_DIR="$(mktemp -d)"  # the adaptive policy starts from its start-up probe

# 0. one forward of 1 / 2 / 3 / 4 / 9 rows, as mlx-lm and as mtpd load the model, under MKL and OpenBLAS
.venv/bin/python bench/forward.py
MTPD_BLAS=openblas .venv/bin/python bench/forward.py

# 1. plain decoding against mlx-lm's own loop on the same weights (loaded as mlx-lm runs them)
$mtpd bench --prompts $prompts --drafter none --spec off --baseline mlx-lm --max-tokens 128 \
  --json $out/off-vs-mlx-lm.json

# 1b. the default policy against mlx-lm's loop, in one run
$mtpd bench --prompts $prompts --spec off --spec adaptive --baseline mlx-lm --max-tokens 128 \
  --json $out/adaptive-vs-mlx-lm.json

# 1c. the README's headline table and docs/benchmarks.md's policies, in one run
$mtpd bench --prompts $prompts --spec off --spec fixed:1 --spec fixed:4 --spec adaptive --baseline mlx-lm \
  --max-tokens 128 --json $out/amd-policies-128.json

# 2. every policy with the shipped drafter (adaptive: drafter and lookup copies; adaptive:mtp: drafter alone)
$mtpd bench --prompts $prompts --spec off --spec fixed:1 --spec fixed:2 --spec fixed:3 --spec fixed:4 \
  --spec fixed:5 --spec fixed:6 --spec adaptive:mtp --spec adaptive --max-tokens 128 \
  --json $out/policies.json --plot $out/policies.png

# 2a. the code prompts with longer answers (up to 256 tokens)
grep '"category": "code"' $prompts > "$MTPD_CACHE_DIR/code.jsonl"
$mtpd bench --prompts "$MTPD_CACHE_DIR/code.jsonl" --spec off --spec fixed:1 --spec fixed:2 --spec adaptive \
  --max-tokens 256 --json $out/amd-code-256.json

$mtpd bench --prompts $prompts --spec off --spec fixed:1 --spec fixed:2 --spec adaptive --max-tokens 256 \
  --json $out/amd-all-256.json

# 2b. acceptance by draft position of the shipped drafter (its fixed:4 rows alone)
$mtpd bench --prompts $prompts --spec fixed:4 --max-tokens 128 --json $out/positions.json

# 3. acceptance with the drafter quantized on its own
for bits in 8 4 3; do
  $mtpd bench --prompts $prompts --spec fixed:4 --drafter-bits $bits --max-tokens 48 \
    --json $out/drafter-$bits-bit.json
done
$mtpd bench --prompts $prompts --spec fixed:4 --max-tokens 48 --json $out/drafter-16-bit.json

# 3b. the adaptive policy's confidence floor, A/B
.venv/bin/python bench/floor_ab.py --json $out/floor-ab.json

# 4. verification made expensive on purpose: adaptive must turn itself off
$mtpd bench --prompts $prompts --spec off --spec adaptive --verify-penalty-ms 60 --max-tokens 64 \
  --json $out/expensive-verify.json

# 5. teacher-forced acceptance of the shipped drafter on the target's greedy answers to the prompts
.venv/bin/python bench/acceptance.py --json $out/acceptance.json

# 6. long contexts: prefill, then forwards of 1 and 5 rows, attention's softmax in NumPy against MLX's
.venv/bin/python bench/prefill.py --tokens 300 600 1024 2048 4096 8000 --rounds 2 --steps 8 \
  --json $out/prefill.json

# 6b. prompts of 1.5k-6k tokens (a source file or a document, then a task), against mlx-lm's loop
$mtpd bench --prompts bench/long-prompts.jsonl --spec off --spec adaptive --baseline mlx-lm --max-tokens 128 \
  --json $out/long-prompts.json

# 7. many clients at once: mtpd adaptive, mtpd off and mlx-lm's own server (docs/benchmarks.md)
.venv/bin/python bench/load.py --clients 1 4 8 --rounds 2 --max-tokens 96 --json $out/load.json \
  --png $out/load.png

# 7b. draft policies in a batch, in-process (docs/serving.md): 8 and 4 sequences, interleaved
.venv/bin/python bench/batch.py --sequences 8 --specs off adaptive fixed:1 --reps 3 --max-tokens 96
.venv/bin/python bench/batch.py --sequences 4 --specs off adaptive fixed:1 --reps 3 --max-tokens 96

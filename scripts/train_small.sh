#!/usr/bin/env bash
# Reproduce the small models of docs/results.md on the bundled corpus (CPU: hours; GPU: minutes).
# Every step resumes exactly if interrupted: just run the script again.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
sllm-train svae --config configs/svae-small.json                      # stage 1: SentenceVAE
sllm-train eval runs/svae-small --n-exact 2000 --n-loss 20000 --report docs/results/svae-small.md
sllm-train plot runs/svae-small --out docs/results/svae-small-curve.png
sllm-train sllm --config configs/sllm-small.json                      # stage 2: graft onto OPT
sllm-train baseline --config configs/baseline-small.json              # same passages, token by token
sllm-train compare runs/sllm-small runs/baseline-small --report docs/results/sllm-vs-baseline.md

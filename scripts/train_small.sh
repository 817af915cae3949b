#!/usr/bin/env bash
# Reproduce the bundled default model (models/default) and docs/results.md on the bundled corpus
# (2-core CPU: about 2.5 hours; GPU: minutes). Every training step resumes exactly if
# interrupted: just run the script again.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
sllm-train svae --config configs/svae-small.json                      # stage 1: SentenceVAE
sllm-train eval runs/svae-small --n-exact 2000 --n-loss 20000 --report docs/results/svae-small.md
sllm-train plot runs/svae-small --out docs/results/svae-small-curve.png
# The baseline needs only stage 1's tokenizer: on a machine with cores to spare, run it beside stage 2.
sllm-train sllm --config configs/sllm-small.json                      # stage 2: graft onto OPT
sllm-train baseline --config configs/baseline-small.json              # same passages, token by token
sllm-train eval runs/sllm-small --n-exact 2000 --n-loss 20000 --report docs/results/sllm-small-svae.md
sllm-train plot runs/sllm-small --out docs/results/sllm-small-curve.png
sllm-train compare runs/sllm-small runs/baseline-small --report docs/results/sllm-vs-baseline.md
sllm-export runs/sllm-small --out models/default --force             # edge + cloud bundles
sllm-export runs/baseline-small --out models/default --force          # models/default/baseline (bench)
# The baseline at the SLLM's total budget (both stages, 25.5 M tokens; issue 18): ~3 h on 2 cores.
sllm-train baseline --config configs/baseline-fair.json data.tokenizer=runs/svae-small
sllm-train compare runs/sllm-small runs/baseline-fair --report docs/results/sllm-vs-baseline-fair.md

#!/usr/bin/env bash
# The main job. Until the chat client lands (issue 6) it trains a small SentenceVAE on the
# bundled corpus for a few minutes and prints its evaluation (loss, PPL, exact match, Table 2).
# A second run resumes the same run directory; delete runs/demo to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
sllm-train svae --config configs/svae-demo.json "$@"
sllm-train eval runs/demo --n-exact 500 --n-loss 5000

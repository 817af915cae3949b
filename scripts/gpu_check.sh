#!/usr/bin/env bash
# The CUDA training path in one go, for a session with a GPU: bf16 autocast + torch.compile on the
# paper's 125M configs (configs/paper/*-125m.json), about 100 steps a stage (SentenceVAE, SLLM,
# baseline), printing target tokens/s and MFU (against the card's peak bf16 FLOP/s) per stage.
#
#   scripts/gpu_check.sh [--opt OPT_DIR] [--steps N] [--dry-run]
#     --opt      a local Hugging Face OPT folder: its tokenizer (OPT's 50272-row vocabulary, as in the paper);
#                default: the shipped model's small tokenizer, so the output layers are smaller than the paper's
#     --steps    steps a stage [100]; the first 20 (allocation, compilation) are not timed
#     --dry-run  no GPU needed: the sizes of the three configs and the command it would run
# Writes runs/gpu-check/train-throughput.json. Exit status 3: no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] && PATH="$PWD/.venv/bin:$PATH"

STEPS=100 DRY=0 TOKENIZER=models/default/svae
while [[ $# -gt 0 ]]; do
  case "$1" in
    --opt) TOKENIZER=${2:?--opt needs a folder}; shift 2;;
    --steps) STEPS=${2:?}; shift 2;;
    --dry-run) DRY=1; shift;;
    *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2;;
  esac
done
CMD=(python -m bench.train_throughput --size 125m --steps "$STEPS" --warmup 20 --threads 4 --documents 5000
     --tokenizer "$TOKENIZER" --require-cuda --set train.precision=bf16 --set train.compile=true
     --json runs/gpu-check/train-throughput.json)

if [[ $DRY == 1 ]]; then
  sllm-train size configs/paper/svae-125m.json configs/paper/sllm-125m.json configs/paper/baseline-125m.json
  echo "+ ${CMD[*]}"
  exit 0
fi
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "error: no CUDA device visible to torch ($(python -c 'import torch; print("torch", torch.__version__, "CUDA build", torch.version.cuda)')): this check needs a GPU; --dry-run shows what it would run" >&2
  exit 3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"${CMD[@]}"

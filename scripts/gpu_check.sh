#!/usr/bin/env bash
# The CUDA paths in one go, for a session with a GPU (a few minutes):
#   1. the cloud: the engine's tests on the GPU, its step time against context (float32 and bfloat16),
#      and its cost per output token against the token-level model at 1-64 clients (never run so far);
#   2. training: bf16 autocast + torch.compile on the paper's 125M configs (configs/paper/*-125m.json),
#      about 100 steps a stage (SentenceVAE, SLLM, baseline), printing target tokens/s and MFU (against
#      the card's peak bf16 FLOP/s) per stage.
#
#   scripts/gpu_check.sh [--opt OPT_DIR] [--steps N] [--no-cloud] [--dry-run]
#     --opt      a local Hugging Face OPT folder: its tokenizer (OPT's 50272-row vocabulary, as in the paper);
#                default: the shipped model's small tokenizer, so the output layers are smaller than the paper's
#     --steps    steps a stage [100]; the first 20 (allocation, compilation) are not timed
#     --no-cloud the training part only
#     --dry-run  no GPU needed: the sizes of the three configs and the commands it would run
# Writes runs/gpu-check/ (engine-context-*.{json,md}, cloud-cost.*, train-throughput.json). Exit status 3:
# no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] && PATH="$PWD/.venv/bin:$PATH"

STEPS=100 DRY=0 CLOUD=1 TOKENIZER=models/default/svae
while [[ $# -gt 0 ]]; do
  case "$1" in
    --opt) TOKENIZER=${2:?--opt needs a folder}; shift 2;;
    --steps) STEPS=${2:?}; shift 2;;
    --no-cloud) CLOUD=0; shift;;
    --dry-run) DRY=1; shift;;
    *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2;;
  esac
done
CMD=(python -m bench.train_throughput --size 125m --steps "$STEPS" --warmup 20 --threads 4 --documents 5000
     --tokenizer "$TOKENIZER" --require-cuda --set train.precision=bf16 --set train.compile=true
     --json runs/gpu-check/train-throughput.json)

OUT=runs/gpu-check
CLOUD_CMDS=(
  "python -m pytest -q tests/test_cloud_engine.py -k cuda"
  "python -m bench.engine_context --device cuda --dtype float32 --threads 4 --out $OUT/engine-context-fp32"
  "python -m bench.engine_context --device cuda --dtype bfloat16 --threads 4 --out $OUT/engine-context-bf16"
  "python -m bench.cloud_cost --device cuda --clients 1,16,64 --rounds 2 --out $OUT/cloud-cost"
)
if [[ $DRY == 1 ]]; then
  sllm-train size configs/paper/svae-125m.json configs/paper/sllm-125m.json configs/paper/baseline-125m.json
  [[ $CLOUD == 1 ]] && printf '+ %s\n' "${CLOUD_CMDS[@]}"
  echo "+ ${CMD[*]}"
  exit 0
fi
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "error: no CUDA device visible to torch ($(python -c 'import torch; print("torch", torch.__version__, "CUDA build", torch.version.cuda)')): this check needs a GPU; --dry-run shows what it would run" >&2
  exit 3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
mkdir -p "$OUT"
if [[ $CLOUD == 1 ]]; then
  for c in "${CLOUD_CMDS[@]}"; do echo "+ $c"; $c || echo "FAILED ($?): $c"; done  # each part reports on its own
fi
"${CMD[@]}"

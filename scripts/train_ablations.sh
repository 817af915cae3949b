#!/usr/bin/env bash
# The paper's Table-1-style ablations (configs/ablations/), each a SentenceVAE grafted on the quality
# chain's pretrained OPT (the recipe of scripts/train_quality.sh, shorter), at equal target tokens:
#   depth        svae-h1, svae-h2, svae-h4: 1, 2, 4 encoder + decoder blocks, d=256, comma split
#                (1,125 steps, 4.0 M tokens each), then sllm-h1/h2/h4 (300 steps, 1.5 M tokens each)
#   granularity  h1 (comma split, <= 64 tokens a piece: runs/quality/data) against svae/sllm-nocomma
#                (no comma split) and svae/sllm-max8 (comma split, <= 8 tokens a piece); batches sized so
#                every step trains on the same target tokens whatever the piece length
# then, for every row, the SentenceVAE before and after stage 2 (exact reconstruction, PPL) and the SLLM
# against the OPT it was grafted on (token PPL over the same tokens), on validation and on the held-out
# register, into RESULTS (docs/results/ablations) and the table scripts/ablation_table.py writes.
#
# Needs the quality chain's prepared dataset and exported OPT (QUALITY/data, QUALITY/baseline-pretrain-hf:
# scripts/train_quality.sh writes both first), and refuses to share the CPU with that chain.
# About 3 h 45 min on 2 quiet CPU cores, estimated: ~110 GFLOP/s (baseline-pretrain's ~3,500 tokens/s at
# 31.5 MFLOP a token) for stage 1, half that for stage 2 (as svae-small / sllm-small ran), with
# `sllm-train size`'s FLOPs a token: stage 1 h1, nocomma, max8 ~11 min each, h2 ~18, h4 ~31; stage 2
# h1, nocomma, max8 ~14 min each, h2 ~22, h4 ~38; the evaluations ~40 min.
# Idempotent: a finished run or an up-to-date report is skipped, an unfinished run resumes exactly from
# its last checkpoint (SIGTERM to the training process saves first).
#   scripts/train_ablations.sh                                   # into runs/ablations
#   SMOKE=1 OUT=/tmp/abl scripts/train_ablations.sh              # every step, tiny models, a few steps
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/runs.sh  # PATH, SMOKE and the steps of a chain
CFG=configs/ablations
sizes
if [ "$SMOKE" = 1 ]; then
  QUALITY=$OUT/quality  # a tiny stand-in for the quality chain's dataset and OPT, built below
  TABLE=(--heldout-documents 20)
else
  OUT=${OUT:-runs/ablations}
  RESULTS=${RESULTS:-docs/results/ablations}
  QUALITY=${QUALITY:-runs/quality}
  PREPARE=(--workers 2)
  TABLE=()
fi
mkdir -p "$OUT" "$RESULTS"
exec 9>"$OUT/.train_ablations.lock"
flock -n 9 || { echo "error: another train_ablations.sh is running on $OUT" >&2; exit 1; }
HF=$QUALITY/baseline-pretrain-hf/baseline

TRAIN_DEFAULTS=()

if [ "$SMOKE" = 1 ]; then  # the quality chain's first steps, tiny: a comma-split dataset and a pretrained OPT
  [ -f "$QUALITY/data/manifest.json" ] || sllm-train prepare --out "$QUALITY/data" \
    --config configs/quality/baseline-pretrain.json "${PREPARE[@]}"
  if [ ! -f "$QUALITY/baseline-pretrain/latest" ]; then
    sllm-train baseline --config configs/quality/baseline-pretrain.json --out "$QUALITY/baseline-pretrain" \
      data.dataset="$QUALITY/data" opt.hidden_size=32 opt.num_hidden_layers=2 opt.num_attention_heads=2 \
      opt.ffn_dim=64 train.batch_size=2 "${STEPS[@]}"
  fi
  [ -f "$HF/manifest.json" ] || sllm-export "$QUALITY/baseline-pretrain" --out "$QUALITY/baseline-pretrain-hf" --force
else
  for need in "$QUALITY/data/manifest.json" "$HF/manifest.json"; do
    [ -f "$need" ] || { echo "error: $need is missing: scripts/train_quality.sh prepares and exports it first" >&2; exit 1; }
  done
  # both chains at once would each run at half speed on 2 cores; the quality chain may also re-export its OPT
  flock -n "$QUALITY/.train_quality.lock" true || {
    echo "error: scripts/train_quality.sh is running on $QUALITY: start this when it ends" >&2; exit 1; }
fi

# the granularities: the quality chain's dataset (comma split, <= 64 tokens a piece) and two more of the
# same corpus, tokenizer, split and passage limits (32 sentences / 512 tokens)
declare -A DATA=([comma]="$QUALITY/data" [nocomma]="$OUT/data-nocomma" [max8]="$OUT/data-max8")
for g in nocomma max8; do
  [ -f "${DATA[$g]}/manifest.json" ] || sllm-train prepare --out "${DATA[$g]}" --config "$CFG/svae-$g.json" \
    --tokenizer "$QUALITY/data" "${PREPARE[@]}"
done

declare -A GRANULARITY=([h1]=comma [h2]=comma [h4]=comma [nocomma]=nocomma [max8]=max8)
# the cheap rows first, and each row evaluated and tabled as soon as it is trained: a chain cut short by the
# end of a session leaves whole rows in the table (h1 is both the depth and the granularity reference)
ROWS=(h1 max8 nocomma h2 h4)
for row in "${ROWS[@]}"; do
  data=data.dataset="${DATA[${GRANULARITY[$row]}]}"
  train svae "svae-$row" "$data" init.embeddings_from="$HF" "${SVAE[@]}"
  train sllm "sllm-$row" "$data" opt.pretrained="$HF" sllm.svae_checkpoint="$OUT/svae-$row" "${STAGE2[@]}"
  for text in validation heldout; do
    if [ "$text" = heldout ]; then opts=(--heldout); n=(--n-passages "$N_HELDOUT"); else opts=(); n=(--n-passages "$N_VAL"); fi
    evaluate "svae-$row-$text" "$OUT/svae-$row" "${opts[@]}"
    evaluate "sllm-$row-svae-$text" "$OUT/sllm-$row" "${opts[@]}"
    compare "sllm-$row-vs-baseline-$text" "$OUT/sllm-$row" "$HF" "${opts[@]}" "${n[@]}"
  done
  python scripts/ablation_table.py "$OUT" "$RESULTS" "${TABLE[@]}"
done

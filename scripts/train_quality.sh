#!/usr/bin/env bash
# The paper's recipe against training from scratch, at equal total tokens (configs/quality/):
#   baseline-pretrain   token-level OPT, 2,200 x 16 passages                 10.8 M tokens
#   -> export           its Hugging Face folder: what the recipe starts from (OUT/baseline-pretrain-hf/baseline)
#   svae-init           SentenceVAE, token embeddings from that OPT, 2,800 x 256 sentences   9.9 M
#   sllm-pretrained     stage 2 grafted on that OPT, SentenceVAE from svae-init, 910 x 16    4.6 M  (total 25.3 M)
#   baseline-continued  that OPT trained on, 2,955 x 16 passages                 14.5 M  (total 25.3 M)
#   svae-scratch        SentenceVAE from random weights, 5,845 x 256 sentences   20.8 M
#   sllm-scratch        stage 2 on fresh OPT blocks, 910 x 16 passages            4.6 M  (total 25.3 M)
# then the comparisons, on validation and on the held-out register, into RESULTS (docs/results/quality).
# The paper's protocol (its OPT evaluated as downloaded; its SLLM grafted from that OPT and trained one
# epoch on the evaluation corpus) on the held-out register, split 98/2 (heldout-data):
#   sllm-heldout        stage 2 grafted on the pretrained OPT, SentenceVAE from svae-init, ~1 epoch of it
#   baseline-heldout    the pretrained OPT trained the same ~1 epoch on it (the third row)
# Order: baseline-pretrain, export, svae-init, sllm-pretrained, baseline-continued, the two held-out runs,
# then svae-scratch and sllm-scratch (the longest, last).
#
# Hours on 2 CPU cores. Idempotent: a finished run is skipped, an unfinished one resumes exactly from
# its last checkpoint, so after a kill (SIGTERM to the training process saves first) run it again.
#   scripts/train_quality.sh                            # into runs/quality
#   SMOKE=1 OUT=/tmp/q RESULTS=/tmp/q/results scripts/train_quality.sh   # every step, tiny and short
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/runs.sh  # PATH, SMOKE and the steps of a chain
CFG=configs/quality
sizes
if [ "$SMOKE" != 1 ]; then
  OUT=${OUT:-runs/quality}
  RESULTS=${RESULTS:-docs/results/quality}
fi
mkdir -p "$OUT" "$RESULTS"
exec 9>"$OUT/.train_quality.lock"
flock -n 9 || { echo "error: another train_quality.sh is running on $OUT" >&2; exit 1; }
HF=$OUT/baseline-pretrain-hf/baseline

TRAIN_DEFAULTS=(data.dataset="$OUT/data")

# the prepared dataset (vocab 4,096, comma split, passages of <= 32 sentences / 512 tokens)
[ -f "$OUT/data/manifest.json" ] || sllm-train prepare --out "$OUT/data" --config "$CFG/baseline-pretrain.json" "${PREPARE[@]}"

train baseline baseline-pretrain "${OPT[@]}"
if [ ! -f "$HF/manifest.json" ] || [ "$OUT/baseline-pretrain/latest" -nt "$HF/manifest.json" ]; then
  sllm-export "$OUT/baseline-pretrain" --out "$OUT/baseline-pretrain-hf" --force  # fp16 Hugging Face folder
fi
train svae svae-init "${SVAE[@]}" init.embeddings_from="$HF"
train sllm sllm-pretrained opt.pretrained="$HF" sllm.svae_checkpoint="$OUT/svae-init" "${STAGE2[@]}"
train baseline baseline-continued opt.pretrained="$HF" "${OPT[@]}"
# the paper's protocol: the held-out register as a training corpus of its own (same tokenizer and settings)
[ -f "$OUT/heldout-data/manifest.json" ] || sllm-train prepare data/heldout --out "$OUT/heldout-data" \
  --config "$CFG/baseline-pretrain.json" --tokenizer "$OUT/data" "${PREPARE[@]}"
HELDOUT_DATA=(data.dataset="$OUT/heldout-data")
train sllm sllm-heldout opt.pretrained="$HF" sllm.svae_checkpoint="$OUT/svae-init" "${STAGE2[@]}" "${HELDOUT_DATA[@]}"
train baseline baseline-heldout opt.pretrained="$HF" "${OPT[@]}" "${HELDOUT_DATA[@]}"

# from scratch last: the longest runs (svae-scratch ~3 h on 2 cores)
train svae svae-scratch "${SVAE[@]}"
train sllm sllm-scratch sllm.svae_checkpoint="$OUT/svae-scratch" "${OPT[@]}"


# protocol (a), equal total tokens: both SLLMs against the continued baseline, and the recipe's SLLM
# against the OPT it started from (the paper's baseline, evaluated as is)
for text in validation heldout; do
  if [ "$text" = heldout ]; then opts=(--heldout --n-passages "$N_HELDOUT"); else opts=(--n-passages "$N_VAL"); fi
  compare "sllm-pretrained-vs-baseline-continued-$text" "$OUT/sllm-pretrained" "$OUT/baseline-continued" "${opts[@]}"
  compare "sllm-scratch-vs-baseline-continued-$text" "$OUT/sllm-scratch" "$OUT/baseline-continued" "${opts[@]}"
  compare "sllm-pretrained-vs-baseline-pretrain-$text" "$OUT/sllm-pretrained" "$HF" "${opts[@]}"
  if [ "$text" = heldout ]; then opts=(--heldout); else opts=(); fi
  evaluate "svae-init-$text" "$OUT/svae-init" "${opts[@]}"
  evaluate "svae-scratch-$text" "$OUT/svae-scratch" "${opts[@]}"
done
# the paper's protocol, on the held-out register's own validation documents (the runs' validation split)
compare "paper-sllm-heldout-vs-baseline-pretrain" "$OUT/sllm-heldout" "$HF" --n-passages "$N_VAL"
compare "paper-sllm-heldout-vs-baseline-heldout" "$OUT/sllm-heldout" "$OUT/baseline-heldout" --n-passages "$N_VAL"
python scripts/quality_table.py "$OUT" "$RESULTS"

#!/usr/bin/env bash
# The paper's setting in one command: prepare the corpus, stage 1 (SentenceVAE), stage 2 (SLLM, from a
# local pretrained OPT folder when given), the token-level baseline, export, and the bench.
#
#   scripts/train_paper.sh SIZE [--pretrained OPT_DIR] [--corpus PATH]... [--blocks 1|2|4] [--dry-run]
#     SIZE            125m, 350m or 1.3b (configs/paper/*-SIZE.json)
#     --pretrained    a Hugging Face OPT folder (config.json, weights, tokenizer): stage 2 and the baseline
#                     start from it, stage 1 its token embeddings (not 350m: 512 wide), and every stage
#                     uses its GPT-2 BPE (50272 rows); nothing is downloaded
#     --corpus        corpus files or folders (default: the bundled corpus)
#     --blocks        SentenceVAE encoder and decoder blocks (the paper's H1, H2, H4; default 1)
#     --dry-run       print the sizes (sllm-train size) and the commands; run nothing
#   NPROC=8 runs each stage as torchrun --standalone --nproc_per_node=8; TORCHRUN_ARGS replaces those
#   launcher options (several nodes: --nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT --rdzv-id=ID).
#   Extra overrides for every training stage: TRAIN_OVERRIDES="train.max_steps=20000 train.batch_size=16".
# Every stage resumes exactly where it stopped: run the script again after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 ]] || usage
SIZE=$1; shift
case "$SIZE" in 125m|350m|1.3b) ;; *) echo "error: SIZE must be 125m, 350m or 1.3b, got '$SIZE'" >&2; exit 2;; esac
PRETRAINED="" BLOCKS=1 DRY=0 CORPUS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --pretrained) PRETRAINED=${2:?--pretrained needs a folder}; shift 2;;
    --corpus) CORPUS+=("${2:?--corpus needs a path}"); shift 2;;
    --blocks) BLOCKS=${2:?}; shift 2;;
    --dry-run) DRY=1; shift;;
    -h|--help) usage;;
    *) echo "error: unknown option '$1'" >&2; usage;;
  esac
done
case "$BLOCKS" in 1|2|4) ;; *) echo "error: --blocks must be 1, 2 or 4" >&2; exit 2;; esac
if [[ -n $PRETRAINED && ! -f $PRETRAINED/config.json ]]; then
  echo "error: --pretrained $PRETRAINED is not a Hugging Face checkpoint folder (no config.json)" >&2; exit 2
fi

[[ -x .venv/bin/sllm-train ]] && PATH="$PWD/.venv/bin:$PATH"
CONF=configs/paper
NAME=$SIZE-h$BLOCKS
DATASET=data/prepared/paper-$SIZE${PRETRAINED:+-opt}
MODEL=models/paper-$NAME
NPROC=${NPROC:-1}
LAUNCH=(sllm-train)
if [[ -n ${TORCHRUN_ARGS:-} ]]; then
  read -r -a extra <<<"$TORCHRUN_ARGS"; LAUNCH=(torchrun "${extra[@]}" -m sllm.training.cli)
elif [[ $NPROC -gt 1 ]]; then
  LAUNCH=(torchrun --standalone "--nproc_per_node=$NPROC" -m sllm.training.cli)
fi
read -r -a EXTRA <<<"${TRAIN_OVERRIDES:-}"
SVAE=(model.encoder_layers="$BLOCKS" model.decoder_layers="$BLOCKS")
OPT=()
if [[ -n $PRETRAINED ]]; then
  OPT=(opt.pretrained="$PRETRAINED" data.tokenizer="$PRETRAINED")
  # the paper starts the SentenceVAE's token embeddings from OPT's; OPT-350M's are 512 wide, not 1024
  [[ $SIZE == 350m ]] || SVAE+=(init.embeddings_from="$PRETRAINED")
fi

run() { echo "+ $*" >&2; [[ $DRY == 1 ]] || "$@"; }

if [[ $DRY == 1 ]]; then  # sizes first: nothing below needs a GPU or data
  sllm-train size "$CONF/svae-$SIZE.json" "$CONF/sllm-$SIZE.json" "$CONF/baseline-$SIZE.json" \
    --processes "$NPROC"
  [[ $BLOCKS == 1 ]] || sllm-train svae --config "$CONF/svae-$SIZE.json" --dry-run "${SVAE[@]}"
fi
run sllm-train prepare "${CORPUS[@]}" --out "$DATASET" --config "$CONF/svae-$SIZE.json" \
  ${PRETRAINED:+--tokenizer "$PRETRAINED"}
run "${LAUNCH[@]}" svae --config "$CONF/svae-$SIZE.json" --out "runs/paper/svae-$NAME" \
  data.dataset="$DATASET" "${SVAE[@]}" "${EXTRA[@]}"
run "${LAUNCH[@]}" sllm --config "$CONF/sllm-$SIZE.json" --out "runs/paper/sllm-$NAME" \
  data.dataset="$DATASET" sllm.svae_checkpoint="runs/paper/svae-$NAME" "${OPT[@]}" "${EXTRA[@]}"
run "${LAUNCH[@]}" baseline --config "$CONF/baseline-$SIZE.json" --out "runs/paper/baseline-$SIZE" \
  data.dataset="$DATASET" data.tokenizer="runs/paper/svae-$NAME" ${PRETRAINED:+opt.pretrained="$PRETRAINED"} \
  "${EXTRA[@]}"
run sllm-export "runs/paper/sllm-$NAME" --out "$MODEL" --force
run sllm-export "runs/paper/baseline-$SIZE" --out "$MODEL" --force
run python -m bench --quick --model "$MODEL" --out "docs/results/paper-$NAME" --work "runs/bench-paper-$NAME" \
  --sllm-run "runs/paper/sllm-$NAME" --baseline-run "runs/paper/baseline-$SIZE"

# Shared by the long-run scripts (train_quality.sh, train_ablations.sh): sourced, never run.
# `sizes` sets how big every run and report is (SMOKE=1: tiny, every step in a few seconds).
# Sourced from the repository root: the project's .venv goes first on PATH when there is one.

[ -x .venv/bin/sllm-train ] && PATH="$PWD/.venv/bin:$PATH"
SMOKE=${SMOKE:-0}
# Each run is skipped when finished and resumes from its last checkpoint otherwise; each report is
# skipped while it is newer than the models it reads. The caller sets OUT, CFG, RESULTS, STEPS (overrides
# appended to every run), TRAIN_DEFAULTS (overrides put before the run's own), N_EXACT and N_LOSS.

sizes() {  # STEPS, SVAE, OPT, STAGE2 (overrides), PREPARE (options), N_* (report sizes); SMOKE=1: RESULTS too
  if [ "${SMOKE:-0}" = 1 ]; then
    : "${OUT:?SMOKE=1 needs OUT=a scratch folder}"  # never the long runs' folder
    RESULTS=${RESULTS:-$OUT/results}
    STEPS=(train.max_steps=2 train.warmup_steps=1 train.eval_every=0 train.eval_batches=1 train.log_every=1
           train.save_every=1 train.threads=1 data.cache_dir="$OUT/cache")
    SVAE=(model.d_model=32 model.n_heads=2 model.ffn_dim=64 train.batch_size=8)
    OPT=(opt.hidden_size=32 opt.num_hidden_layers=2 opt.num_attention_heads=2 opt.ffn_dim=64 train.batch_size=2)
    STAGE2=(train.batch_size=2)
    PREPARE=(--max-documents 30 --workers 1)
    N_VAL=4; N_HELDOUT=4; N_EXACT=4; N_LOSS=50
  else
    STEPS=(); SVAE=(); OPT=(); STAGE2=(); PREPARE=()
    N_VAL=0; N_HELDOUT=2000; N_EXACT=1000; N_LOSS=20000
  fi
}

finished() {  # the run's latest checkpoint reached the max_steps its own config.json records
  python - "$1" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
try:
    state = json.loads((run / (run / "latest").read_text().strip() / "trainer_state.json").read_text())
    sys.exit(0 if state["step"] >= json.loads((run / "config.json").read_text())["train"]["max_steps"] else 1)
except (OSError, ValueError, KeyError):
    sys.exit(1)
EOF
}

train() {  # train COMMAND NAME [overrides...]
  local command=$1 name=$2 pid
  shift 2
  if [ -f "$OUT/$name.pid" ] && pid=$(cat "$OUT/$name.pid") && kill -0 "$pid" 2>/dev/null; then
    echo "error: $OUT/$name is being trained by process $pid (started outside this script): run this again when it ends" >&2
    exit 3
  fi
  if finished "$OUT/$name"; then
    echo "== $name: finished, skipped"
    return
  fi
  echo "== $name: sllm-train $command (resumes if a checkpoint is there), $(date -u +%H:%M:%S) UTC"
  sllm-train "$command" --config "$CFG/$name.json" --out "$OUT/$name" "${TRAIN_DEFAULTS[@]}" "$@" "${STEPS[@]}"
}

stamp() {  # the file that changes when a run (its latest) or a bundle (its manifest) changes
  if [ -f "$1/latest" ]; then echo "$1/latest"; else echo "$1/manifest.json"; fi
}

compare() {  # compare NAME SLLM BASELINE [options...]
  local name=$1 sllm=$2 base=$3
  shift 3
  if [ "$RESULTS/$name.json" -nt "$(stamp "$sllm")" ] && [ "$RESULTS/$name.json" -nt "$(stamp "$base")" ]; then
    echo "== $name: up to date"
    return
  fi
  sllm-train compare "$sllm" "$base" --report "$RESULTS/$name.md" "$@"
}

evaluate() {  # evaluate NAME MODEL [options...]: the SentenceVAE of a stage-1 or stage-2 run
  local name=$1 model=$2
  shift 2
  if [ "$RESULTS/$name.json" -nt "$(stamp "$model")" ]; then
    echo "== $name: up to date"
    return
  fi
  sllm-train eval "$model" --n-exact "$N_EXACT" --n-loss "$N_LOSS" --report "$RESULTS/$name.md" "$@"
}

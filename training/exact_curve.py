"""Exact-match reconstruction at every saved checkpoint of a run: where more training would take it.

Results are cached per checkpoint in `<run>/exact_match.jsonl` (keyed by step and sample size),
so re-plotting costs nothing and a longer run only evaluates its new checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

from sllm.training import checkpoint as ckpt
from sllm.training.evaluate import exact_match, validation_sentences
from sllm.training.load import load_sentence_vae

CACHE_FILE = "exact_match.jsonl"


def run_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    found = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*") if (p / ckpt.MANIFEST).is_file())
    if not found:
        raise ckpt.CheckpointError(f"{run_dir} has no complete checkpoints under checkpoints/")
    return found


def exact_match_curve(run_dir: Path, n_sentences: int, log=print) -> list[dict]:
    """One row per checkpoint: step, tokens_seen, exact_match, exact_match_le16 (greedy, EMA weights)."""
    cache_path = Path(run_dir) / CACHE_FILE
    cached = {}
    if cache_path.is_file():
        for line in cache_path.read_text().splitlines():
            row = json.loads(line)
            cached[(row["step"], row["sentences_asked"])] = row
    rows, val = [], None
    for d in run_checkpoints(run_dir):
        state = ckpt.read_trainer_state(d)
        key = (state["step"], n_sentences)
        if key not in cached:
            trained = load_sentence_vae(d)
            if val is None:  # every checkpoint of a run shares its tokenizer and split
                val = validation_sentences(trained, log=log)
            m = exact_match(trained, val, n_sentences)
            cached[key] = {"step": state["step"], "tokens_seen": state.get("tokens_seen", 0),
                           "sentences_asked": n_sentences, **m}
            with cache_path.open("a") as f:
                f.write(json.dumps(cached[key]) + "\n")
            log(f"step {state['step']}: exact match {m['exact_match']:.1%} (<= 16 tokens {m['exact_match_le16']:.1%})")
        rows.append(cached[key])
    return rows

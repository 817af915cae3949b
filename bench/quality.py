"""Validation PPL of the SLLM vs the baseline, token-level and over the same tokens (docs/sllm.md):
recomputed from the two training runs when given, else the recorded `sllm-train compare` result,
marked as such, with whether its checkpoints are the ones the benchmarked bundles came from."""
from __future__ import annotations

import json
from pathlib import Path

from bench.config import ROOT


def relative(path: Path) -> str:
    """`path` relative to the repository when it lies inside it (the report stays readable)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _model_id(checkpoint: str, make) -> str | None:
    """The id the export would give this checkpoint, if it is still on disk (None otherwise)."""
    for base in (Path(checkpoint), ROOT / checkpoint):
        if (base / "ema.safetensors").is_file():
            return make(base)
    return None


def _provenance(result: dict, sllm_model_id: str, baseline_model_id: str | None) -> dict:
    """Were the scored checkpoints the ones the benchmarked bundles were exported from? (None: unknown)"""
    from sllm.export import baseline_bundle
    from sllm.modeling.cloud_bundle import model_id_for

    s_id = _model_id(result["sllm"]["checkpoint"], model_id_for)
    b_id = _model_id(result["baseline"]["checkpoint"], baseline_bundle.baseline_model_id)
    return {"sllm_checkpoint_is_bundle": None if s_id is None else s_id == sllm_model_id,
            "baseline_checkpoint_is_bundle": None if b_id is None or baseline_model_id is None
            else b_id == baseline_model_id}


def _summary(result: dict, source: str) -> dict:
    s, b = result["sllm"], result["baseline"]
    return {"source": source, "passages": result["passages"], "tokens": s["tokens"],
            "sllm_ppl": s["ppl"], "sllm_loss": s["loss"], "baseline_ppl": b["ppl"], "baseline_loss": b["loss"],
            "sllm_checkpoint": s["checkpoint"], "baseline_checkpoint": b["checkpoint"],
            "stop_accuracy": s.get("stop_accuracy")}


def recorded_ppl(path: Path, sllm_model_id: str, baseline_model_id: str | None) -> dict | None:
    if not Path(path).is_file():
        return None
    result = json.loads(Path(path).read_text())
    return {**_summary(result, f"recorded: {relative(path)} (sllm-train compare of the training runs)"),
            **_provenance(result, sllm_model_id, baseline_model_id)}


def recomputed_ppl(sllm_run: Path, baseline_run: Path, passages: int, sllm_model_id: str,
                   baseline_model_id: str | None, log) -> dict:
    from sllm.training.evaluate_lm import compare_sllm_baseline

    result = compare_sllm_baseline(sllm_run, baseline_run, passages, log=log)
    return {**_summary(result, f"recomputed now: sllm-train compare {sllm_run} {baseline_run}"),
            **_provenance(result, sllm_model_id, baseline_model_id)}

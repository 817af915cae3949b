"""The token-level baseline as a self-contained folder, for benchmarks beside the SLLM bundle.

    sllm-export runs/baseline-small --out models/default      # writes models/default/baseline/

    baseline/
      config.json, generation_config.json, model.safetensors   HF `save_pretrained` of the
                            OPTForCausalLM, float16 weights (half the size; the benchmark and any
                            user load it back with `OPTForCausalLM.from_pretrained` and run it in fp32)
      tokenizer.json, tokenizer_meta.json                      the baseline's tokenizer (the SLLM's)
      manifest.json          kind "baseline", model id, source checkpoint, sizes, the verification,
                             sha256 of every file

The folder is assembled in a hidden temporary folder inside OUT and renamed into place only
after the reloaded fp16 weights (run in fp32) gave the checkpoint's logits back within the
tolerance below; nothing else in OUT is touched (edge/ and cloud/ may live beside it).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import OPTForCausalLM
from transformers.utils import logging as hf_logging

from sllm.modeling.baseline_bundle import FOLDER, KIND, load_hf_opt
from sllm.runtime.artifacts import CheckpointError
from sllm.runtime.files import replace_dir, sha256_file
from sllm.runtime.manifest import BundleError, read_manifest, write_manifest
from sllm.training.load import load_baseline

STEPS = ("load", "write", "verify", "install")
# fp16 keeps ~3 significant digits per weight; through 4-12 layers that moves logits by a few
# hundredths at most. The rule is relative to the logits' scale, so it fits models of any size,
# and is still far below what a wrong or shuffled tensor does (differences of order the logits).
RELATIVE_TOLERANCE = 0.01  # max |logit_fp16 - logit_fp32| <= RELATIVE_TOLERANCE * max(1, max |logit_fp32|)
MIN_ARGMAX_AGREEMENT = 0.98  # and the next-token argmax agrees on >= 98% of positions (near-ties may flip)
TOLERANCE_RULE = (f"max |logit(fp16 bundle, run in fp32) - logit(checkpoint)| <= {RELATIVE_TOLERANCE} x "
                  f"max(1, max |logit(checkpoint)|), and the argmax agrees on >= {MIN_ARGMAX_AGREEMENT:.0%} "
                  "of positions")


class BaselineExportError(Exception):
    """A user error: not a baseline checkpoint, an occupied output folder."""


class BaselineVerificationFailed(Exception):
    """The reloaded fp16 bundle does not reproduce the checkpoint; nothing was installed."""


@dataclass
class BaselineExport:
    path: Path  # OUT/baseline
    manifest: dict


def baseline_model_id(checkpoint_dir: Path, weights: str = "ema") -> str:
    return "opt-baseline-" + sha256_file(Path(checkpoint_dir) / f"{weights}.safetensors")[:16]


def _probe_ids(vocab_size: int, max_positions: int, bos_id: int, specials: set[int], seed: int = 0) -> list[np.ndarray]:
    """Token sequences to compare logits on: random ids (weights, not text, are what is checked)
    of a short, a medium and a long length, each starting with bos as in training."""
    rng = np.random.default_rng(seed)
    pool = np.array([i for i in range(vocab_size) if i not in specials])
    out = []
    for n in (8, 64, min(256, max_positions)):
        ids = rng.choice(pool, size=n)
        ids[0] = bos_id
        out.append(ids.astype(np.int64))
    return out


def compare_logits(reference, candidate, probes: list[np.ndarray]) -> dict:
    """Run both models on each probe; the worst absolute difference, the logits' scale and argmax agreement."""
    worst, scale, agree, positions = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for ids in probes:
            x = torch.from_numpy(ids)[None]
            a = reference(input_ids=x).logits[0].float()
            b = candidate(input_ids=x).logits[0].float()
            worst = max(worst, float((a - b).abs().max()))
            scale = max(scale, float(a.abs().max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            positions += a.shape[0]
    limit = RELATIVE_TOLERANCE * max(1.0, scale)
    agreement = agree / max(positions, 1)
    return {"max_abs_diff": worst, "max_abs_logit": scale, "limit": limit, "argmax_agreement": agreement,
            "positions": positions, "ok": worst <= limit and agreement >= MIN_ARGMAX_AGREEMENT}


def _check_out(out: Path, model_id: str, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BaselineExportError(f"--out {out} exists and is not a directory")
    d = out / FOLDER
    if not d.exists():
        return
    try:
        other = read_manifest(d, kind=KIND, verify=False).get("model_id")
        problem = None if other == model_id else f"{d} holds a different baseline ({other}; this checkpoint is {model_id})"
    except BundleError as e:
        problem = f"{d} is not a readable baseline folder ({e})"
    if problem and not force:
        raise BaselineExportError(problem + "; pass --force to replace it")


def export_baseline(checkpoint: Path, out: Path, *, weights: str = "ema", force: bool = False,
                    progress: Callable[[str], None] | None = None) -> BaselineExport:
    """Write OUT/baseline from a trained opt_baseline checkpoint (or run dir), verified, atomically."""

    step = progress or (lambda name: None)
    out = Path(out)
    step("load")
    if weights not in ("ema", "model"):
        raise BaselineExportError(f"--weights must be 'ema' or 'model', got {weights!r}")
    try:
        trained = load_baseline(checkpoint, weights=weights)
    except (CheckpointError, ValueError) as e:
        raise BaselineExportError(f"cannot export {checkpoint} as the token-level baseline: {e}") from None
    model_id = baseline_model_id(trained.path, weights)
    _check_out(out, model_id, force)
    model, tok, cfg = trained.model.float().eval(), trained.tokenizer, trained.model.config

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".baseline."))
    try:
        step("write")
        half = OPTForCausalLM(cfg)  # a copy: the checkpoint's fp32 model stays the reference
        half.load_state_dict(model.state_dict())
        hf_logging.disable_progress_bar()
        half.half().save_pretrained(tmp, safe_serialization=True)
        del half
        tok.save(tmp)

        step("verify")
        reloaded = load_hf_opt(tmp)
        probes = _probe_ids(cfg.vocab_size, cfg.max_position_embeddings, tok.bos_id,
                            {tok.pad_id, tok.bos_id, tok.eos_id})
        check = compare_logits(model, reloaded, probes)
        if not check["ok"]:
            raise BaselineVerificationFailed(
                f"the fp16 baseline does not reproduce the checkpoint: max |logit diff| {check['max_abs_diff']:.4g} "
                f"(limit {check['limit']:.4g}), argmax agreement {check['argmax_agreement']:.1%}; nothing was "
                "installed")
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        n_params = sum(p.numel() for p in model.parameters())
        write_manifest(tmp, {
            "kind": KIND, "model_id": model_id, "source_checkpoint": str(trained.path), "weights": weights,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dtype": "float16", "run_dtype": "float32",
            "parameters": n_params, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_hidden_layers, "num_heads": cfg.num_attention_heads,
            "max_positions": cfg.max_position_embeddings, "pad_id": tok.pad_id, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "torch": torch.__version__,
            "verification": {"tolerance": TOLERANCE_RULE, **check},
        }, files)

        step("install")
        tmp.chmod(0o755)  # mkdtemp makes it private; the bundle is meant to be shared like edge/ and cloud/
        for f in tmp.iterdir():
            f.chmod(0o644)
        final = out / FOLDER
        replace_dir(tmp, final)
        return BaselineExport(final, json.loads((final / "manifest.json").read_text()))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

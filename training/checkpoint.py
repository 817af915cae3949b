"""Checkpoint files: atomic writes, safetensors, integrity checks.

A checkpoint is a directory:
    model.safetensors      raw weights
    ema.safetensors        EMA weights (what inference loads by default)
    optimizer.safetensors  AdamW moments, flattened; param groups in its metadata
    rng_rank{r}.safetensors  per-process RNG state
    trainer_state.json     step, data position, world size
    config.json            the run config
    tokenizer.json (+ tokenizer_meta.json)
    manifest.json          sha256 of every file above, written last
The directory is assembled under a temporary name and renamed into place, and
`latest` (a text file in the run dir) is replaced atomically after that, so a
kill at any moment leaves either the old or the new checkpoint, never half of one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from modeling.weights import load_state_into, load_tensors, read_metadata, save_tensors
from runtime.artifacts import MANIFEST, CheckpointError, resolve_checkpoint
from runtime.files import atomic_write_bytes, atomic_write_text, sha256_file


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"state.{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": json.dumps(sd["param_groups"])}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    try:
        opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"optimizer state does not fit this model: {e}") from None

# ---------------------------------------------------------------- checkpoint dirs

def write_checkpoint_dir(final_dir: Path, write_files) -> None:
    """Call `write_files(tmp_dir)`, add the manifest, and rename tmp_dir to final_dir."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=f".{final_dir.name}."))
    try:
        write_files(tmp)
        hashes = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"sha256": hashes}, indent=2, sort_keys=True))
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify_checkpoint_dir(ckpt_dir: Path) -> None:
    """Check every file against the manifest; raise CheckpointError on any difference."""
    ckpt_dir = Path(ckpt_dir)
    manifest = ckpt_dir / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a checkpoint (no {MANIFEST})")
    try:
        hashes = json.loads(manifest.read_text())["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest} is corrupt ({e})") from None
    for name, expected in hashes.items():
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file missing: {path}")
        if sha256_file(path) != expected:
            raise CheckpointError(f"checkpoint file {path} is corrupt or truncated (sha256 differs from the manifest)")


__all__ = ["CheckpointError", "resolve_checkpoint", "atomic_write_bytes", "atomic_write_text", "load_state_into", "load_tensors",
           "read_metadata", "save_tensors", "sha256_file"]


def read_trainer_state(ckpt_dir: Path) -> dict:
    """The trainer's step, data position and token count saved with a checkpoint."""
    return json.loads((Path(ckpt_dir) / "trainer_state.json").read_text())

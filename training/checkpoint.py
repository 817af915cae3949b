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

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not fit the model."""


# ---------------------------------------------------------------- atomic files

def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- tensors <-> files

def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses shared or non-contiguous storage: give it plain copies
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(plain, str(path), metadata=metadata)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e})") from None


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e})") from None


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


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir whose `latest` file names one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint or run directory: {path}")
    if (path / MANIFEST).is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / MANIFEST).is_file():
            return target
        raise CheckpointError(f"{latest} points to {target}, which is not a complete checkpoint")
    raise CheckpointError(f"{path} is neither a checkpoint (no {MANIFEST}) nor a run directory (no 'latest')")


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights strictly, turning key and shape mismatches into one readable error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)})")
        raise CheckpointError(f"the weights in {source} do not match the config: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)

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
The directory is assembled under a hidden temporary name (`.step_N.tmp-PID-xxxx`),
every file and the folder are fsynced, and it is renamed into place (an existing
folder of that name is renamed aside first and deleted last); `latest` (a text
file in the run dir) is replaced atomically after that. A kill at any moment
leaves complete checkpoints only, plus at worst hidden folders that the next
start of the run cleans up (`clean_stale_writes`): a `latest` that names a
missing checkpoint falls back to the newest complete one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from sllm.modeling.weights import load_state_into, load_tensors, read_metadata, save_tensors
from sllm.runtime.artifacts import MANIFEST, CheckpointError, resolve_checkpoint, verify_checkpoint_dir
from sllm.runtime.files import atomic_write_bytes, atomic_write_text, fsync_dir, fsync_tree, replace_dir, sha256_file


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
    """Call `write_files(tmp_dir)`, add the manifest, fsync it all, and put tmp_dir in place of final_dir."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=f".{final_dir.name}.tmp-{os.getpid()}-"))
    try:
        write_files(tmp)
        hashes = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"sha256": hashes}, indent=2, sort_keys=True))
        fsync_tree(tmp)  # the data is on disk before a rename can make the folder visible
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # renames only: the old folder aside, the new one in, then the old one deleted. A kill between
    # the renames leaves both as hidden folders; clean_stale_writes renames the new one into place.
    replace_dir(tmp, final_dir)
    fsync_dir(final_dir.parent)


# Hidden folders a killed checkpoint write leaves in checkpoints/: the folder being written
# (.step_N.tmp-PID-xxxxxxxx), the old folder renamed aside by replace_dir (.step_N.old-PID), and
# the folder being written by versions before these names (.step_N.xxxxxxxx: tempfile's 8 letters).
_STALE = re.compile(r"\.(step_\d+)\."
                    r"(?:tmp-(?P<tmp_pid>\d+)-[a-z0-9_]{8}|old-(?P<old_pid>\d+)|(?P<legacy>[a-z0-9_]{8}))")
LEGACY_STALE_AFTER_S = 3600.0  # a folder without a pid in its name: its writer is gone after an hour untouched


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there; keep such folders
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_writes(checkpoints: Path, log: Callable[[str], None] = print) -> None:
    """Tidy the hidden folders that killed checkpoint writes left in `checkpoints`. Only our own
    names, and only when their writer is gone (the pid in the name is no live process, or is this
    one; a name without a pid: untouched for LEGACY_STALE_AFTER_S). A complete one whose checkpoint
    is missing (a kill between replace_dir's two renames) is renamed into place; the rest are removed."""
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        return
    stale = []
    for p in checkpoints.iterdir():
        m = _STALE.fullmatch(p.name)
        if m is None or p.is_symlink() or not p.is_dir():
            continue
        pid = m["tmp_pid"] or m["old_pid"]
        if pid is not None and int(pid) != os.getpid() and _pid_alive(int(pid)):
            log(f"left {p} alone: process {pid} that writes it is running")
            continue
        if pid is None and time.time() - p.stat().st_mtime < LEGACY_STALE_AFTER_S:
            continue
        stale.append((m["old_pid"] is not None, p, checkpoints / m[1]))
    for _, p, final in sorted(stale):  # folders being written before old ones renamed aside
        if not final.exists():
            try:
                verify_checkpoint_dir(p)
            except CheckpointError:
                pass
            else:
                os.replace(p, final)
                fsync_dir(checkpoints)
                log(f"recovered {final} from {p.name}, which a killed run left complete")
                continue
        shutil.rmtree(p, ignore_errors=True)
        log(f"removed {p}, left by a killed run")


def step_of(checkpoint: Path) -> int | None:
    """N for a folder named step_N, else None."""
    m = re.fullmatch(r"step_(\d+)", Path(checkpoint).name)
    return int(m[1]) if m else None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints/step_N folders that hold a manifest (written last), newest step first."""
    found = [(step_of(p), p) for p in (Path(run_dir) / "checkpoints").glob("step_*")]
    return [p for n, p in sorted((x for x in found if x[0] is not None), reverse=True) if (p / MANIFEST).is_file()]


def read_trainer_state(ckpt_dir: Path) -> dict:
    """The trainer's step, data position and token count saved with a checkpoint."""
    return json.loads((Path(ckpt_dir) / "trainer_state.json").read_text())


# re-exported: the trainer reads and writes checkpoints through this one module
__all__ = ["CheckpointError", "resolve_checkpoint", "verify_checkpoint_dir", "atomic_write_bytes", "atomic_write_text", "load_state_into", "load_tensors",
           "read_metadata", "save_tensors", "sha256_file"]

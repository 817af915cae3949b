"""What a path holds: a training checkpoint (or a run dir, meaning its latest checkpoint), a
bundle, or an export folder. One place decides, for every command; it reads JSON only (no torch),
so the edge can tell a user who points it at a checkpoint what to do instead.

    checkpoint   manifest.json {"sha256": ...} + config.json {"kind": sentence_vae | sllm | opt_baseline}
    run dir      a `latest` file naming its newest checkpoint
    bundle       manifest.json {"kind": edge | cloud | baseline, "files": ...}
    export       a folder holding edge/ (and cloud/, baseline/): what `sllm-export --out` writes
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sllm.runtime.files import sha256_file

MANIFEST = "manifest.json"
CHECKPOINT_KINDS = {"sentence_vae": "a SentenceVAE (stage 1) checkpoint", "sllm": "an SLLM (stage 2) checkpoint",
                    "opt_baseline": "a token-level OPT baseline checkpoint"}
BUNDLE_KINDS = {"edge": "an edge bundle", "cloud": "a cloud bundle", "baseline": "a baseline bundle"}
EXPORT = "export"
DESCRIPTIONS = {**CHECKPOINT_KINDS, **BUNDLE_KINDS, EXPORT: "an export folder (edge/ + cloud/)"}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not fit the model."""


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


@dataclass(frozen=True)
class Artifact:
    path: Path  # the checkpoint itself for a run dir
    kind: str  # a key of DESCRIPTIONS

    @property
    def is_checkpoint(self) -> bool:
        return self.kind in CHECKPOINT_KINDS

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.kind]


def resolve_checkpoint(path: str | Path, notify: Callable[[str], None] | None = None) -> Path:
    """A checkpoint dir, or a run dir: the checkpoint its `latest` file names or, when that one is
    missing or incomplete (a run killed at a bad moment, a folder deleted by hand), the newest
    complete one in its checkpoints/ folder, said through `notify` (default: a line on stderr)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint or run directory: {path}")
    if (path / MANIFEST).is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        target = path / name
        if name and (target / MANIFEST).is_file():
            return target
        steps = [(int(p.name[5:]), p) for p in (path / "checkpoints").glob("step_*")
                 if p.name[5:].isdigit() and (p / MANIFEST).is_file()]
        if not steps:
            raise CheckpointError(f"{latest} points to {target}, which is not a complete checkpoint, and "
                                  f"{path / 'checkpoints'} holds no complete one")
        newest = max(steps)[1]
        (notify or (lambda m: print(m, file=sys.stderr)))(
            f"{latest} points to {target}, which is not a complete checkpoint: using the newest complete one, {newest}")
        return newest
    raise CheckpointError(f"{path} is neither a checkpoint (no {MANIFEST}) nor a run directory (no 'latest')")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is missing or not valid JSON ({e})") from None


def identify(path: str | Path) -> Artifact:
    """The kind of checkpoint, bundle or export folder at `path` (CheckpointError when it is none)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint, run directory or bundle: {path}")
    if not (path / MANIFEST).is_file() and (path / "edge" / MANIFEST).is_file():
        return Artifact(path, EXPORT)
    if not (path / MANIFEST).is_file() and not (path / "latest").is_file():
        raise CheckpointError(f"{path} is neither a checkpoint nor a bundle (no {MANIFEST}), a run directory (no "
                              "'latest') or an export folder (no edge/)")
    d = resolve_checkpoint(path)
    manifest = _read_json(d / MANIFEST)
    if isinstance(manifest, dict) and manifest.get("kind") in BUNDLE_KINDS:
        return Artifact(d, manifest["kind"])
    if not isinstance(manifest, dict) or "sha256" not in manifest:
        raise CheckpointError(f"{d / MANIFEST} is neither a checkpoint nor a bundle manifest")
    config = _read_json(d / "config.json")
    kind = config.get("kind", "sentence_vae") if isinstance(config, dict) else None
    if kind not in CHECKPOINT_KINDS:
        raise CheckpointError(f"{d} holds a {kind!r} checkpoint, which this version does not know (kinds: "
                              f"{', '.join(sorted(CHECKPOINT_KINDS))})")
    return Artifact(d, kind)


def expect(path: str | Path, *kinds: str) -> Artifact:
    """`identify(path)`, refused (CheckpointError) unless it is one of `kinds`."""
    found = identify(path)
    if found.kind not in kinds:
        wanted = " or ".join(DESCRIPTIONS[k] for k in kinds)
        raise CheckpointError(f"{found.path} holds {found.description}, not {wanted}")
    return found

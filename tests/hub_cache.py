"""A model-hub cache made by hand, in the layout huggingface_hub writes and reads, so that tests
resolve `ORG/NAME[@REVISION]` with no network (HF_HUB_CACHE pointing here, HF_HUB_OFFLINE=1):

    CACHE/models--ORG--NAME/blobs/<sha256>              the files' bytes
    CACHE/models--ORG--NAME/snapshots/<commit>/<path>   relative symlinks into blobs/
    CACHE/models--ORG--NAME/refs/<branch or tag>        the commit it names
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def repo_folder(cache: Path, repo_id: str) -> Path:
    return Path(cache) / ("models--" + repo_id.replace("/", "--"))


def export_files(model: Path, parts: tuple[str, ...]) -> dict[str, Path]:
    """{path in the repo: file} for the given top-level folders of an export folder."""
    return {f"{part}/{f.relative_to(model / part).as_posix()}": f
            for part in parts for f in sorted((model / part).rglob("*")) if f.is_file()}


def add_snapshot(cache: Path, repo_id: str, files: dict[str, Path], refs: tuple[str, ...] = ("main",)) -> str:
    """One commit of `repo_id` holding `files`, named by each of `refs`; returns its commit hash."""
    root = repo_folder(cache, repo_id)
    listing = hashlib.sha1()
    blobs = {}
    for name, source in sorted(files.items()):
        digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
        blobs[name] = digest
        listing.update(f"{name}:{digest}\n".encode())
        blob = root / "blobs" / digest
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, blob)
    listing.update(repr(refs).encode())
    commit = listing.hexdigest()
    snapshot = root / "snapshots" / commit
    for name, digest in blobs.items():
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(root / "blobs" / digest, link.parent))
    for ref in refs:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return commit

"""Bundle manifests: what a bundle holds and the sha256 of every file. No torch here:
the edge imports this module to check its bundle before loading it.

Every file name a manifest gives (its `files` and any field naming one of them) is a plain
relative name inside the bundle folder: no absolute path, no `..`, and no symlink that leads out
of the folder. Anything else is refused (BundleError) before a byte of it is read. One place
outside is the folder's own: a bundle in a model-hub cache snapshot (`models--ORG--NAME/snapshots/
COMMIT/...`, runtime/models.py) holds its files as links into that repo's `blobs/`, as
huggingface_hub stores every download."""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from sllm.runtime.files import atomic_write_text, sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CLOUD_WEIGHTS = "cloud.safetensors"  # the cloud bundle's weights: their sha256 is the cloud model's identity


class BundleError(ValueError):
    """A bundle that is missing, damaged, or not the model it claims to be."""


def write_manifest(bundle_dir: Path, fields: dict, files: list[str]) -> dict:
    """Write manifest.json with `fields`, the format version and the sha256 of each file (atomically)."""
    bundle_dir = Path(bundle_dir)
    manifest = {"format_version": FORMAT_VERSION, **fields,
                "files": {name: sha256_file(bundle_file(bundle_dir, name)) for name in sorted(files)}}
    atomic_write_text(bundle_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def bundle_file(bundle_dir: Path, name: object) -> Path:
    """bundle_dir / name, for a name that stays inside the folder: a relative path of plain parts
    (no absolute path, drive, backslash, `.` or `..`), which, symlinks followed, is still inside
    the folder. BundleError otherwise."""
    bundle_dir = Path(bundle_dir)
    why = _unsafe_name(name) or _outside(bundle_dir, name)
    if why is not None:
        raise BundleError(f"{bundle_dir}: the manifest names the file {name!r}, which {why}; a bundle's files "
                          "are plain names inside its folder: refusing it")
    return bundle_dir / name


def _outside(bundle_dir: Path, name: str) -> str | None:
    root, real = os.path.realpath(bundle_dir), os.path.realpath(bundle_dir / name)
    try:
        inside = os.path.commonpath([root, real]) == root and real != root
    except ValueError:  # another drive (Windows)
        inside = False
    if not inside and os.path.dirname(real) == _hub_blobs(root):
        inside = True  # a hub snapshot's file: a link into its repo's blob store
    return None if inside else f"leads out of the bundle folder (to {real})"


def _hub_blobs(root: str) -> str | None:
    """The blobs/ folder of the model-hub cache repo when `root` lies in one of its snapshots
    (REPO/snapshots/COMMIT/...), else None."""
    parts = Path(root).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
            return os.path.join(*parts[:i], "blobs")
    return None


def _unsafe_name(name: object) -> str | None:
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if "\\" in name or "\0" in name or ":" in name:
        return "holds a backslash, colon or NUL"
    path = PurePosixPath(name)
    if path.is_absolute():
        return "is an absolute path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "is not a plain relative name (empty, `.` or `..` parts)"
    return None


def read_manifest(bundle_dir: Path, kind: str | None = None, verify: bool = True,
                  required: tuple[str, ...] = ()) -> dict:
    """Read manifest.json; check format, kind, that every file name stays inside the folder, that
    the `required` files are listed, and (by default) every file's sha256."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise BundleError(f"no such bundle directory: {bundle_dir}")
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a bundle (no {MANIFEST})")
    if _outside(bundle_dir, MANIFEST):
        raise BundleError(f"{path} is a link to {os.path.realpath(path)}, outside the bundle folder: refusing it")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is corrupt ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{path} is not a bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {manifest.get('format_version')!r}, this program reads "
                          f"format {FORMAT_VERSION}; re-export the bundle")
    if kind is not None and manifest.get("kind") != kind:
        raise BundleError(f"{bundle_dir} is a {manifest.get('kind')!r} bundle, not {kind!r}")
    files = {name: bundle_file(bundle_dir, name) for name in manifest["files"]}
    unlisted = [name for name in required if name not in files]
    if unlisted:
        raise BundleError(f"{bundle_dir}: the manifest does not list {', '.join(unlisted)} (unverifiable); "
                          "re-export the bundle")
    if verify:
        for name, digest in manifest["files"].items():
            if not files[name].is_file():
                raise BundleError(f"{bundle_dir}: file {name} listed in the manifest is missing")
            if sha256_file(files[name]) != digest:
                raise BundleError(f"{bundle_dir}: {name} does not match its manifest hash (corrupt or modified); "
                                  "re-export the bundle")
    return manifest


def listed_file(bundle_dir: Path, manifest: dict, key: str) -> Path:
    """The file a manifest field names (encoder_file, ...): one of the manifest's (checked) files."""
    name = manifest.get(key)
    if name not in manifest["files"]:
        raise BundleError(f"{bundle_dir}: {key} {name!r} is not among the manifest's files")
    return bundle_file(bundle_dir, name)


def cloud_weights_sha256(cloud_manifest: dict) -> str:
    """The identity of a cloud model: the sha256 its manifest gives for its weights."""
    return str(cloud_manifest.get("files", {}).get(CLOUD_WEIGHTS, ""))

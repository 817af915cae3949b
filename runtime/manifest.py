"""Bundle manifests: what a bundle holds and the sha256 of every file. No torch here:
the edge imports this module to check its bundle before loading it."""
from __future__ import annotations

import json
from pathlib import Path

from runtime.files import atomic_write_text, sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A bundle that is missing, damaged, or not the model it claims to be."""



def write_manifest(bundle_dir: Path, fields: dict, files: list[str]) -> dict:
    """Write manifest.json with `fields`, the format version and the sha256 of each file (atomically)."""
    bundle_dir = Path(bundle_dir)
    manifest = {"format_version": FORMAT_VERSION, **fields,
                "files": {name: sha256_file(bundle_dir / name) for name in sorted(files)}}
    atomic_write_text(bundle_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(bundle_dir: Path, kind: str | None = None, verify: bool = True) -> dict:
    """Read manifest.json; check format, kind and (by default) every file's sha256."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise BundleError(f"no such bundle directory: {bundle_dir}")
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a bundle (no {MANIFEST})")
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
    if verify:
        for name, digest in manifest["files"].items():
            f = bundle_dir / name
            if not f.is_file():
                raise BundleError(f"{bundle_dir}: file {name} listed in the manifest is missing")
            if sha256_file(f) != digest:
                raise BundleError(f"{bundle_dir}: {name} does not match its manifest hash (corrupt or modified); "
                                  "re-export the bundle")
    return manifest

"""A model by name: a local folder, or a model-hub id `ORG/NAME[@REVISION]` fetched with
huggingface_hub into its standard cache (HF_HUB_CACHE / HF_HOME; HF_HUB_OFFLINE=1 or
local_files_only: the cache only, never the network). Every command's --model and the Python API
resolve through `resolve_model`; a hub repo holds what `sllm-export --out DIR` writes (edge/,
cloud/, svae/, baseline/) or a checkpoint. A path that exists here is always the local folder.

Torch-free (the edge imports it); huggingface_hub is imported only when a hub id is given.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

DEFAULT_MODEL = Path("models/default")  # the bundled model, in a source checkout
# what the hub accepts: ORG/NAME of letters, digits, '-', '_', '.'; a revision is a branch, tag or commit
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.\-/]+))?")
ASK = ("pass --model ORG/NAME[@REVISION] (a model on the Hugging Face Hub, fetched into its cache) or "
       "--model DIR (a folder holding edge/ and cloud/, as `sllm-export --out DIR` writes)")


class ModelError(ValueError):
    """A model that cannot be found or fetched; the message says what to do."""


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `spec` reads as ORG/NAME[@REVISION], else None."""
    m = _HUB_ID.fullmatch(str(spec).strip())
    return (m["repo"], m["revision"]) if m else None


def resolve_model(spec: str | Path, parts: Sequence[str] = (), *, optional: Sequence[str] = (),
                  local_files_only: bool = False, cache_dir: str | Path | None = None) -> Path:
    """The local folder `spec` names. A hub id is fetched (only `parts` and `optional`, the top-level
    folders wanted, when any are named; else the whole repo) or found in the cache; each of `parts`
    must be there (ModelError otherwise), `optional` ones may be missing."""
    path = Path(spec).expanduser()
    if path.exists():
        _require(path, parts, str(spec))
        return path
    hub = parse_hub_id(str(spec))
    if hub is None:
        raise ModelError(f"no such folder: {spec} (nor is it a model-hub id ORG/NAME[@REVISION])")
    folder = _fetch(*hub, [*parts, *optional], local_files_only, cache_dir)
    _require(folder, parts, str(spec), cached=True)
    return folder


def edge_bundle_folder(spec: str | Path, **kwargs) -> Path:
    """An edge bundle: `spec` itself when it holds one (manifest.json), else its edge/ (an export folder,
    or a hub id whose repo holds one). `kwargs`: resolve_model's."""
    path = Path(spec).expanduser()
    if (path / "manifest.json").is_file() or (path.exists() and not (path / "edge").is_dir()):
        return path  # a bundle, or a folder the bundle reader explains
    return resolve_model(spec, ("edge",), **kwargs) / "edge"


def default_model(cwd: Path | None = None, checkout: Path | None = None) -> Path | None:
    """models/default under the working folder, else in the source checkout this code runs from
    (an editable install), else None."""
    for root in (cwd or Path.cwd(), checkout or _checkout()):
        if root is not None and (root / DEFAULT_MODEL).is_dir():
            return root / DEFAULT_MODEL
    return None


def no_default_model_message() -> str:
    return f"no --model given and no {DEFAULT_MODEL} here ({Path.cwd()}) or in a source checkout: {ASK}"


def _checkout() -> Path | None:
    import sllm

    root = Path(sllm.__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def _require(folder: Path, parts: Sequence[str], spec: str, cached: bool = False) -> None:
    missing = [p for p in parts if not (folder / p).is_dir()]
    if not missing:
        return
    names = ", ".join(f"{p}/" for p in missing)
    where = f"{spec} (at {folder})" if cached else spec
    fix = (f"; if the repo has them, fetch them once online (unset HF_HUB_OFFLINE) or with "
           f"`hf download {parse_hub_id(spec)[0]}`" if cached else "")
    raise ModelError(f"{where} holds no {names}: not an export folder with the part this needs{fix}")


def _fetch(repo: str, revision: str | None, parts: list[str], local_files_only: bool,
           cache_dir: str | Path | None) -> Path:
    name = f"{repo}@{revision}" if revision else repo
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub import errors as hub
    except ImportError:
        raise ModelError(f"{name} is no folder here, and fetching a model-hub id needs huggingface_hub "
                         "(pip install huggingface_hub)") from None
    offline = local_files_only or constants.HF_HUB_OFFLINE
    patterns = [f"{p}/*" for p in parts] or None
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=patterns, cache_dir=cache_dir,
                                   local_files_only=offline)
    except hub.LocalEntryNotFoundError:
        if offline:
            raise ModelError(
                f"{name} is no folder here and not in the local model-hub cache "
                f"({cache_dir or constants.HF_HUB_CACHE}), and downloads are off "
                f"({'local_files_only' if local_files_only else 'HF_HUB_OFFLINE=1'}): fetch it once online "
                f"(`hf download {repo}{f' --revision {revision}' if revision else ''}`) or pass a local folder"
            ) from None
        raise ModelError(f"{name} is no folder here and the model hub cannot be reached, nor is it in the local "
                         "cache: check the network (or HF_ENDPOINT), or pass a local folder") from None
    except getattr(hub, "IncompleteSnapshotError", ()):  # huggingface_hub >= 1.0
        raise ModelError(f"the cached copy of {name} is incomplete and the hub cannot be reached to finish it: "
                         "fetch it again online") from None
    except hub.GatedRepoError:
        raise ModelError(f"{name} is a gated model: accept its terms on the hub and log in "
                         "(`hf auth login` or HF_TOKEN)") from None
    except hub.RepositoryNotFoundError:
        raise ModelError(f"{name} is no folder here and no model on the hub (or it is private: log in with "
                         "`hf auth login` or set HF_TOKEN)") from None
    except hub.RevisionNotFoundError:
        raise ModelError(f"model {repo} has no revision {revision!r} (a branch, tag or commit)") from None
    except hub.HFValidationError as e:
        raise ModelError(f"{name} is no folder here nor a valid model-hub id ({e})") from None
    except (hub.HfHubHTTPError, OSError) as e:
        raise ModelError(f"cannot fetch {name} from the model hub: {type(e).__name__}: {e}") from None
    return Path(folder)

"""Which install a command needs, checked before it imports anything heavy.

One codebase, several installs (pyproject extras, docs/install.md): an edge install has no torch,
transformers or onnx. A command of another role run there says so in one line and exits 2,
instead of failing later with a traceback:

    require_role("train", "sllm-train")     # first thing in training/cli.py
    # error: `sllm-train` needs the train install: pip install 'sllm[train]' (missing here: torch, ...)

The check is `importlib.util.find_spec` on each role's distinctive top-level modules: nothing is
imported, so `--help` stays fast. Standard library only (the edge imports this module).
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Role:
    extra: str  # the pyproject extra that installs it
    modules: tuple[str, ...]  # top-level modules it imports that the edge install lacks
    install: str  # the command that installs it
    note: str = ""


_TORCH = "install torch==2.13.0 first, or pip pulls a multi-GB CUDA build; docs/install.md"
_ORT = "install torch==2.13.0 first; on CUDA machines 'sllm[edge-gpu]' instead of edge; docs/install.md"
_CLOUD = ("torch", "transformers", "safetensors", "grpc_health", "grpc_reflection")
_TRAIN = ("torch", "transformers", "safetensors", "tqdm", "matplotlib")
_EXPORT = _TRAIN + ("onnx", "onnxscript", "onnxruntime")

ROLES: dict[str, Role] = {
    "edge": Role("edge", ("numpy", "tokenizers", "onnxruntime", "grpc", "google.protobuf", "typer"),
                 "pip install 'sllm[edge]'", "'sllm[edge-gpu]' on CUDA machines"),
    "cloud": Role("cloud", _CLOUD, "pip install 'sllm[cloud]'", _TORCH),
    "train": Role("train", _TRAIN, "pip install 'sllm[train]'", _TORCH),
    "export": Role("export", _EXPORT, "pip install 'sllm[export,edge]'", _ORT),
    "bench": Role("bench", _EXPORT, "pip install 'sllm[bench,edge]'", _ORT),
}


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def missing(role: str) -> list[str]:
    """The role's distinctive modules that this environment cannot import (find_spec, no import)."""
    return [m for m in ROLES[role].modules if not _present(m)]


def role_problem(role: str, command: str) -> str | None:
    """None when this environment holds `role`'s install, else a one-line message (no "error: ")."""
    gone = missing(role)
    if not gone:
        return None
    r = ROLES[role]
    note = f"; {r.note}" if r.note else ""
    return (f"`{command}` needs the {r.extra} install: {r.install} "
            f"(missing here: {', '.join(gone)}{note})")


def require_role(role: str, command: str) -> None:
    """Exit 2 with a one-line message when this environment lacks `role`'s install."""
    problem = role_problem(role, command)
    if problem is not None:
        sys.stderr.write(f"error: {problem}\n")
        sys.stderr.flush()
        raise SystemExit(2)

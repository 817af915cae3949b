"""Which install a command needs, checked before it imports anything heavy.

One codebase, several installs (pyproject extras, docs/install.md): an edge install has no torch,
transformers or onnx. A command of another role run there says so in one line and exits 2,
instead of failing later with a traceback:

    require_role("train", "sllm-train")     # first thing in training/cli.py
    # error: `sllm-train` needs the train install (missing here: torch, ...): pip install torch==2.13.0
    #   --index-url https://download.pytorch.org/whl/cpu (...), then pip install '.[train]' in a checkout ...

No sllm release is on a package index: the commands name a checkout ('.[extra]') or a built wheel.
The check is `importlib.util.find_spec` on each role's distinctive top-level modules: nothing is
imported, so `--help` stays fast. Standard library only (the edge imports this module).
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

TORCH_CPU = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
_TORCH_WHY = "the CPU-only build; without --index-url a plain index gives the multi-GB CUDA build, for GPU servers"


@dataclass(frozen=True)
class Role:
    extra: str  # the pyproject extra that installs it
    modules: tuple[str, ...]  # top-level modules it imports that the edge install lacks
    extras: str  # what to install, in pip's brackets
    gpu_extras: str = ""  # the same on a CUDA machine, when it differs (ONNX Runtime's GPU build)


_CLOUD = ("torch", "transformers", "safetensors", "grpc_health", "grpc_reflection", "onnxruntime", "onnx")
_TRAIN = ("torch", "transformers", "safetensors", "tqdm", "matplotlib")
_EXPORT = _TRAIN + ("onnx", "onnxscript", "onnxruntime")

ROLES: dict[str, Role] = {
    "edge": Role("edge", ("numpy", "tokenizers", "onnxruntime", "grpc", "google.protobuf", "typer"),
                 "edge", "edge-gpu"),
    "cloud": Role("cloud", _CLOUD, "cloud"),
    "train": Role("train", _TRAIN, "train"),
    "export": Role("export", _EXPORT, "export,edge", "export,edge-gpu"),
    "bench": Role("bench", _EXPORT, "bench,edge", "bench,edge-gpu"),
}


def wheel_name() -> str:
    """The file name of this version's wheel (`python -m build --wheel` writes it to dist/)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("sllm")
    except PackageNotFoundError:
        v = "VERSION"
    return f"sllm-{v}-py3-none-any.whl"


def install_command(extras: str) -> str:
    """pip's command for `extras`, from a checkout or from a built wheel."""
    return f"pip install '.[{extras}]' in an sllm checkout, or pip install '{wheel_name()}[{extras}]'"


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
    steps = f"{TORCH_CPU} ({_TORCH_WHY}), then " if "torch" in gone else ""
    gpu = f"; on a CUDA machine [{r.gpu_extras}] instead of [{r.extras}]" if r.gpu_extras else ""
    return (f"`{command}` needs the {r.extra} install (missing here: {', '.join(gone)}): "
            f"{steps}{install_command(r.extras)}{gpu} (docs/install.md)")


def require_role(role: str, command: str) -> None:
    """Exit 2 with a one-line message when this environment lacks `role`'s install."""
    problem = role_problem(role, command)
    if problem is not None:
        sys.stderr.write(f"error: {problem}\n")
        sys.stderr.flush()
        raise SystemExit(2)

"""The installed distribution is the code under test: every project package and command resolves
from a Python started outside the checkout (no cwd, no PYTHONPATH), so a package left out of
pyproject.toml fails here, not on a user's machine. Every layer folder installs as `sllm.<folder>`
(pyproject's package-dir); no console script is named like a shell builtin."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"sllm-train", "sllm-export", "sllm-cloud", "edge-chat"}
SHELL_BUILTINS = {"export", "test", "time", "type", "source", "exec", "eval", "read", "set", "trap", "wait"}


def _layers() -> dict[str, Path]:
    """sllm.<layer> -> the folder pyproject.toml maps it to, for every mapped code package (a folder
    with __init__.py; data folders mapped for their files are not layers)."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in mapping.items() if (ROOT / folder / "__init__.py").is_file()}


def test_every_layer_folder_is_mapped_into_the_namespace():
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert folders == {folder.name for folder in _layers().values()}


def test_every_package_and_command_is_installed(tmp_path):
    layers = _layers()
    probe = (
        "import importlib.util, importlib.metadata, json, sys\n"
        f"packages = {sorted(layers)!r}\n"
        "found = {p: (importlib.util.find_spec(p).origin if importlib.util.find_spec(p) else None) for p in packages}\n"
        "scripts = [e.name for e in importlib.metadata.distribution('sllm').entry_points if e.group == 'console_scripts']\n"
        "print(json.dumps({'found': found, 'scripts': scripts}))\n")
    out = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, check=True)
    result = json.loads(out.stdout)
    missing = [p for p, origin in result["found"].items() if origin is None]
    assert not missing, f"not installed (add them to [tool.setuptools] packages / package-dir): {missing}"
    for p, origin in result["found"].items():
        assert Path(origin).resolve() == (layers[p] / "__init__.py").resolve(), f"{p} resolves to {origin}"
    assert COMMANDS <= set(result["scripts"])
    assert not set(result["scripts"]) & SHELL_BUILTINS

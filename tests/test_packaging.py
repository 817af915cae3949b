"""The installed distribution is the code under test: every project package and command resolves
from a Python started outside the checkout (no cwd, no PYTHONPATH), so a package left out of
pyproject.toml fails here, not on a user's machine."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"sllm-train", "sllm-export", "export", "sllm-cloud", "edge-chat", "sllm-bench"}


def _packages() -> list[str]:
    return sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests")


def test_every_package_and_command_is_installed(tmp_path):
    probe = (
        "import importlib.util, importlib.metadata, json, sys\n"
        f"packages = {_packages()!r}\n"
        "found = {p: (importlib.util.find_spec(p).origin if importlib.util.find_spec(p) else None) for p in packages}\n"
        "scripts = [e.name for e in importlib.metadata.distribution('sllm').entry_points if e.group == 'console_scripts']\n"
        "print(json.dumps({'found': found, 'scripts': scripts}))\n")
    out = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, check=True)
    result = json.loads(out.stdout)
    assert {"edge", "runtime", "modeling", "cloud", "training", "export", "protos", "sentences"} <= set(result["found"])
    missing = [p for p, origin in result["found"].items() if origin is None]
    assert not missing, f"not installed (add them to [tool.setuptools.packages.find]): {missing}"
    for p, origin in result["found"].items():
        assert Path(origin).resolve() == (ROOT / p / "__init__.py").resolve(), f"{p} resolves to {origin}"
    assert COMMANDS <= set(result["scripts"])

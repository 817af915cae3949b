"""Files sllm ships beside its code (the bundled corpus in data/, the run configs in configs/),
found where they are: the package data of an installed sllm (sllm/data, sllm/configs), else the
repository's top-level folders (a checkout, or an editable install, which maps only code)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]


def bundled_dir(name: str, pattern: str = "*") -> Path:
    """The shipped folder `name` ("data/corpus", "configs") holding files that match `pattern`."""
    try:
        installed = Path(str(resources.files("sllm").joinpath(*name.split("/"))))
    except (ModuleNotFoundError, TypeError):  # no sllm installed, or one inside a zip (no plain folder)
        installed = None
    if installed is not None and any(installed.glob(pattern)):
        return installed
    return _CHECKOUT / name

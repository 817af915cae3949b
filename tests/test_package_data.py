"""A non-editable install finds what sllm-train reads at run time (the bundled corpus, the held-out
register, the run configs) as package data: a wheel built from this working tree, installed into a fresh environment,
prepares the bundled corpus with a shipped config from a folder outside the checkout."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from helpers import ROOT

DEV_SITE = Path(sysconfig.get_paths()["purelib"])  # torch, tokenizers, typer...: reused, not reinstalled


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _run(cmd: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_a_wheel_install_finds_the_bundled_corpus_and_configs(tmp_path):
    # the working tree as git sees it (tracked and new files, not ignored ones), without the models
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    src = tmp_path / "src"
    for name in listed:
        if name and not name.startswith("models/") and (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
          tmp_path / "dist", src], cwd=tmp_path, timeout=300)
    wheel = next((tmp_path / "dist").glob("sllm-*.whl"))

    # a fresh environment holding only the wheel; the dev environment's third-party packages are
    # put on its path by a .pth (a plain path: the editable sllm's own .pth there is not processed)
    base_python = Path(sys.base_prefix) / "bin" / "python3"
    _run([base_python, "-m", "venv", "--without-pip", tmp_path / "env"], cwd=tmp_path)
    env_python = tmp_path / "env" / "bin" / "python"
    site = Path(_run([env_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).stdout.strip())
    (site / "dev_packages.pth").write_text(f"{DEV_SITE}\n")
    _run([sys.executable, "-m", "pip", "--python", env_python, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=tmp_path, timeout=300)

    work = tmp_path / "elsewhere"
    work.mkdir()
    _run([tmp_path / "env" / "bin" / "sllm-train", "prepare", "--config", "svae-small", "--out", work / "ds",
          "--max-documents", "6", "--vocab-size", "300", "--workers", "1"], cwd=work)
    manifest = json.loads((work / "ds" / "manifest.json").read_text())
    corpus = {Path(i["path"]).parent for i in manifest["inputs"]}
    assert corpus == {site / "sllm" / "data" / "corpus"}, corpus  # the installed copy, not the checkout's
    assert manifest["settings"]["max_sentence_tokens"] == json.loads(
        (ROOT / "configs" / "svae-small.json").read_text())["model"]["max_sentence_tokens"]
    assert manifest["counts"]["train"]["documents"] + manifest["counts"]["val"]["documents"] == 6
    # the held-out register (compare/eval --heldout) ships the same way
    held = _run([env_python, "-c", "from sllm.training.data.corpus import heldout_dir; print(heldout_dir())"],
                cwd=work).stdout.strip()
    assert Path(held) == site / "sllm" / "data" / "heldout", held
    assert (Path(held) / "encyclopedia.jsonl.gz").is_file() and (Path(held) / "README.md").is_file()

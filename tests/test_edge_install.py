"""The edge install, for real: `.venv-edge` holds a wheel built from a clean copy of the checkout,
installed with its `edge` extra only (scripts/setup_edge.sh; a regular install, no torch /
transformers / onnx), and every check runs from a folder outside the checkout. The wheel installs
the `sllm` namespace and no other top-level module; every module of the edge's packages imports
there, the other roles' packages do not; edge-chat there, given a model-hub id from a local cache,
answers exactly as edge-chat in the full dev env against one real cloud server; the other roles'
commands there fail in one line, and so does edge-chat given no model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cloud_helpers import running_server
from hub_cache import add_snapshot, export_files

ROOT = Path(__file__).resolve().parents[1]
EDGE_ENV = ROOT / ".venv-edge"
FULL_BIN = Path(sys.executable).parent  # the env running the tests (the dev env: every role)
MODEL = ROOT / "models" / "default"
EDGE_PACKAGES = ("sllm.edge", "sllm.runtime", "sllm.sentences", "sllm.protos")
# the repository's layer folders and bench/: none may install as a top-level module
BARE_NAMES = ("edge", "cloud", "runtime", "protos", "export", "bench", "training", "modeling", "sentences")
HUB_REPO = "sllm-test/default"
NOT_IN_EDGE = ("torch", "transformers", "onnx", "safetensors")
PROMPT = "It is a truth universally acknowledged, that a single man must be in want of a wife."


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd: list, cwd: Path, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env={**_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def edge_env() -> Path:
    """.venv-edge, built or refreshed (idempotent: a few ms when up to date, ~1 min from scratch)."""
    proc = subprocess.run([str(ROOT / "scripts" / "setup_edge.sh")], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=540, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"setup_edge.sh failed:\n{proc.stdout}\n{proc.stderr}"
    assert (EDGE_ENV / "bin" / "edge-chat").exists()
    return EDGE_ENV


def test_edge_env_imports_edge_modules_and_lacks_the_others(edge_env, tmp_path):
    """Run outside the checkout (cwd tmp): what imports comes from the installed wheel."""
    script = textwrap.dedent(f"""
        import importlib, importlib.metadata as md, json, pkgutil, sys
        out = {{"absent": {{}}, "imported": [], "failed": {{}}, "files": {{}}}}
        for name in {NOT_IN_EDGE!r}:
            try:
                importlib.import_module(name)
                out["absent"][name] = "imported"
            except ModuleNotFoundError as e:
                out["absent"][name] = "ModuleNotFoundError" if e.name == name else f"other: {{e}}"
        for top in {EDGE_PACKAGES!r}:
            pkg = importlib.import_module(top)
            out["files"][top] = pkg.__file__
            names = [top] + [m.name for m in pkgutil.walk_packages(pkg.__path__, top + ".",
                                                                   onerror=lambda n: out["failed"].setdefault(n, "walk"))]
            for name in names:
                if name.rsplit(".", 1)[-1] == "__main__":
                    continue  # runs the command
                try:
                    importlib.import_module(name)
                    out["imported"].append(name)
                except BaseException as e:
                    out["failed"][name] = f"{{type(e).__name__}}: {{e}}"
        out["heavy_loaded"] = sorted(m for m in {NOT_IN_EDGE!r} if m in sys.modules)
        out["dists"] = sorted(d.metadata["Name"].lower().replace("_", "-") for d in md.distributions())
        print(json.dumps(out))
    """)
    proc = _run([edge_env / "bin" / "python", "-c", script], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["absent"] == {name: "ModuleNotFoundError" for name in NOT_IN_EDGE}
    assert out["failed"] == {}
    assert out["heavy_loaded"] == []
    for top in EDGE_PACKAGES:
        assert top in out["imported"]
        assert Path(out["files"][top]).is_relative_to(edge_env), out["files"][top]  # the wheel, not the checkout
    assert {"sllm.edge.cli", "sllm.edge.command", "sllm.edge.local", "sllm.runtime.roles", "sllm.runtime.models",
            "sllm.protos.client"} <= set(out["imported"])
    dists = set(out["dists"])
    assert {"sllm", "onnxruntime", "numpy", "tokenizers", "grpcio", "protobuf", "typer", "huggingface-hub"} <= dists
    assert not dists & {"torch", "transformers", "onnx", "onnxscript", "safetensors", "onnxruntime-gpu",
                        "matplotlib", "grpcio-health-checking", "grpcio-reflection"}, dists


def test_the_wheel_installs_the_sllm_namespace_only(edge_env, tmp_path):
    """`import sllm.edge` works from the wheel; none of the repository's folder names is importable
    there, and the distribution's files are the `sllm` package, its metadata and its commands."""
    script = textwrap.dedent(f"""
        import importlib.metadata as md, importlib.util, json, sys
        import sllm.edge, sllm
        files = md.distribution("sllm").files
        print(json.dumps({{
            "sllm": sllm.__file__, "version": sllm.__version__,
            "bare": {{name: importlib.util.find_spec(name) is not None for name in {BARE_NAMES!r}}},
            "tops": sorted({{f.parts[0] for f in files if not f.parts[0].startswith("..")}}),
            "scripts": sorted(e.name for e in md.distribution("sllm").entry_points if e.group == "console_scripts"),
        }}))
    """)
    proc = _run([edge_env / "bin" / "python", "-c", script], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert Path(out["sllm"]).is_relative_to(edge_env) and not Path(out["sllm"]).is_relative_to(ROOT / "sllm")
    assert out["bare"] == {name: False for name in BARE_NAMES}
    assert out["tops"] == ["sllm", f"sllm-{out['version']}.dist-info"]
    assert "export" not in out["scripts"]
    assert {"edge-chat", "sllm-cloud", "sllm-train", "sllm-export"} <= set(out["scripts"])
    version = _run([edge_env / "bin" / "edge-chat", "--version"], cwd=tmp_path)
    assert (version.returncode, version.stdout) == (0, f"edge-chat (sllm) {out['version']}\n"), version.stderr


def test_edge_chat_with_a_cached_hub_id_in_the_edge_install_matches_the_full_env(edge_env, tmp_path):
    """One real cloud server (full env, in this process); greedy edge-chat from each env: same text. The
    edge install reads the model as a hub id from a local cache (offline), the full env from the checkout."""
    cache = tmp_path / "hub"
    add_snapshot(cache, HUB_REPO, export_files(MODEL, ("edge",)), refs=("main", "v1"))
    outputs = {}
    with running_server(MODEL / "cloud") as server:
        target = f"127.0.0.1:{server.port}"
        for name, bin_dir, model in (("edge", edge_env / "bin", ["--model", f"{HUB_REPO}@v1"]),
                                     ("full", FULL_BIN, ["--bundle", MODEL / "edge"])):
            proc = _run([bin_dir / "edge-chat", "--server", target, *model, "--prompt", PROMPT,
                         "--max-sentences", "3", "--threads", "1"], cwd=tmp_path,
                        env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
            assert proc.returncode == 0, f"{name}: {proc.stderr}"
            assert "Traceback" not in proc.stderr, f"{name}: {proc.stderr}"
            outputs[name] = proc.stdout
    assert outputs["edge"].strip(), outputs
    assert outputs["edge"] == outputs["full"]


def test_edge_chat_serve_in_the_edge_install(edge_env, tmp_path):
    """`edge-chat serve` from the edge install (its page shipped as package data, starlette and uvicorn from the
    `edge` extra) answers over HTTP what edge-chat prints in the full env."""
    import signal
    import urllib.request

    with running_server(MODEL / "cloud") as server:
        target = f"127.0.0.1:{server.port}"
        expected = _run([FULL_BIN / "edge-chat", "--server", target, "--bundle", MODEL / "edge", "--prompt", PROMPT,
                         "--max-sentences", "3", "--threads", "1"], cwd=tmp_path).stdout
        proc = subprocess.Popen([str(edge_env / "bin" / "edge-chat"), "serve", "--server", target, "--bundle",
                                 str(MODEL / "edge"), "--port", "0", "--max-sentences", "3", "--threads", "1"],
                                cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            url = json.loads(proc.stdout.readline())["url"]
            with urllib.request.urlopen(url, timeout=30) as r:
                assert b"/v1/chat/completions" in r.read()
            body = json.dumps({"messages": [{"role": "user", "content": PROMPT}]}).encode()
            request = urllib.request.Request(url + "v1/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as r:
                answer = json.loads(r.read())["choices"][0]["message"]["content"]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    assert answer.strip() and answer + "\n" == expected


@pytest.mark.parametrize("command, extra, extras", [("sllm-train", "train", "train"), ("sllm-cloud", "cloud", "cloud"),
                                                    ("sllm-export", "export", "export,edge")])
def test_other_roles_commands_fail_in_one_line_in_the_edge_install(edge_env, tmp_path, command, extra, extras):
    t0 = time.perf_counter()
    proc = _run([edge_env / "bin" / command, "--help"], cwd=tmp_path, timeout=60)
    assert time.perf_counter() - t0 < 30
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: `{command}` needs the {extra} install (missing here: torch")
    # the commands that work: a CPU-only torch first, then the extra from a checkout or a built wheel
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in lines[0]
    assert f"pip install '.[{extras}]'" in lines[0] and f"-py3-none-any.whl[{extras}]'" in lines[0]
    # the guard lets the same command through where its role is installed
    full = _run([FULL_BIN / command, "--help"], cwd=tmp_path, timeout=60)
    assert full.returncode == 0, full.stderr
    assert "Usage" in full.stdout or "usage" in full.stdout


def test_edge_chat_local_in_the_edge_install_says_to_install_the_cloud(edge_env, tmp_path):
    proc = _run([edge_env / "bin" / "edge-chat", "--local", "--model", MODEL, "--prompt", PROMPT], cwd=tmp_path,
                timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "`edge-chat --local` needs the cloud install (missing here: torch" in errors[0]
    assert "pip install '.[cloud]'" in errors[0]


def test_edge_chat_outside_the_checkout_without_a_model_says_what_to_pass(edge_env, tmp_path):
    proc = _run([edge_env / "bin" / "edge-chat", "--prompt", PROMPT], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: no --model given and no models/default here ({tmp_path})")
    assert "--model ORG/NAME[@REVISION]" in proc.stderr and "--model DIR" in proc.stderr

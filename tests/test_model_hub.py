"""Models by name: `--model ORG/NAME[@REVISION]` and the Python API resolve through huggingface_hub's
cache (runtime/models.py). The cache is made here by hand (tests/hub_cache.py) and read offline:
nothing is downloaded. The cache holds models/default's folders, so answers can be compared with
the same model given as a local folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cloud_helpers import running_server
from hub_cache import add_snapshot, export_files, repo_folder

from sllm.runtime.models import ModelError, default_model, parse_hub_id, resolve_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "default"
BIN = Path(sys.executable).parent
REPO = "sllm-test/default"
PROMPT = "It is a truth universally acknowledged, that a single man must be in want of a wife."


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """main: edge/, cloud/ and svae/ of models/default; tag v1: edge/ only."""
    cache = tmp_path_factory.mktemp("hub")
    main = add_snapshot(cache, REPO, export_files(MODEL, ("edge", "cloud", "svae")), refs=("main",))
    v1 = add_snapshot(cache, REPO, export_files(MODEL, ("edge",)), refs=("v1",))
    return cache, main, v1


@pytest.fixture
def offline_hub(hub, monkeypatch):
    """huggingface_hub in this process reads `hub`, offline (it read its environment at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub[0]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def _env(hub_cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


@pytest.mark.parametrize("spec, parsed", [
    ("org/name", ("org/name", None)), ("org/name@v1", ("org/name", "v1")),
    ("Org-1/my.model_2@refs/pr/3", ("Org-1/my.model_2", "refs/pr/3")),
    ("name", None), ("a/b/c", None), ("./a/b", None), ("/abs/path", None), ("org/name@", None), ("-o/n", None)])
def test_parse_hub_id(spec, parsed):
    assert parse_hub_id(spec) == parsed


def test_hub_ids_resolve_to_their_cached_snapshots(hub):
    cache, main, v1 = hub
    snapshots = repo_folder(cache, REPO) / "snapshots"
    kw = dict(cache_dir=cache, local_files_only=True)
    assert resolve_model(REPO, ["edge", "cloud"], **kw) == snapshots / main
    assert resolve_model(f"{REPO}@main", **kw) == snapshots / main
    assert resolve_model(f"{REPO}@v1", ["edge"], **kw) == snapshots / v1
    assert resolve_model(f"{REPO}@{v1}", **kw) == snapshots / v1  # a commit hash
    folder = resolve_model(f"{REPO}@v1", ["edge"], **kw)
    assert (folder / "edge" / "manifest.json").read_bytes() == (MODEL / "edge" / "manifest.json").read_bytes()


def test_offline_mode_from_the_environment_is_honoured(offline_hub):
    """HF_HUB_OFFLINE (read by huggingface_hub) alone keeps it from the network: the missing id is a
    cache miss that says so, not a connection attempt."""
    cache, main, _ = offline_hub
    assert resolve_model(REPO) == repo_folder(cache, REPO) / "snapshots" / main
    with pytest.raises(ModelError) as e:
        resolve_model("sllm-test/missing@v2")
    message = str(e.value)
    assert "sllm-test/missing@v2 is no folder here and not in the local model-hub cache" in message
    assert "HF_HUB_OFFLINE=1" in message and str(cache) in message
    assert "hf download sllm-test/missing --revision v2" in message


@pytest.mark.parametrize("spec", ["sllm-test/missing", f"{REPO}@no-such-tag"])
def test_a_missing_id_offline_is_a_clear_error(hub, spec):
    with pytest.raises(ModelError, match=rf"{spec} is no folder here and not in the local model-hub cache .* "
                                         r"downloads are off \(local_files_only\)"):
        resolve_model(spec, cache_dir=hub[0], local_files_only=True)


def test_a_snapshot_without_the_needed_part_says_which(hub):
    with pytest.raises(ModelError, match=rf"{REPO}@v1 \(at .*\) holds no cloud/"):
        resolve_model(f"{REPO}@v1", ["edge", "cloud"], cache_dir=hub[0], local_files_only=True)


def test_local_folders_win_and_missing_ones_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name" / "edge").mkdir(parents=True)
    assert resolve_model("org/name", ["edge"]) == Path("org/name")  # a folder here, though it reads as an id
    with pytest.raises(ModelError, match="no such folder: runs/x/export"):
        resolve_model("runs/x/export")
    with pytest.raises(ModelError, match="org/name holds no cloud/"):
        resolve_model("org/name", ["edge", "cloud"])


def test_default_model_is_looked_for_here_then_in_the_checkout(tmp_path):
    here, checkout = tmp_path / "here", tmp_path / "checkout"
    (checkout / "models" / "default").mkdir(parents=True)
    here.mkdir()
    assert default_model(here, checkout) == checkout / "models" / "default"
    (here / "models" / "default").mkdir(parents=True)
    assert default_model(here, checkout) == here / "models" / "default"
    assert default_model(tmp_path / "elsewhere", tmp_path / "nothing") is None


def test_the_python_api_takes_a_hub_id(offline_hub):
    from sllm import edge

    runtime = edge.load_runtime(f"{REPO}@v1", device="cpu", threads=1)
    local = edge.load_runtime(MODEL / "edge", device="cpu", threads=1)
    assert runtime.model_id == local.model_id and runtime.bundle.manifest == local.bundle.manifest
    with pytest.raises(edge.EdgeError, match="not in the local model-hub cache"):
        edge.load_runtime("sllm-test/missing")


def test_edge_chat_with_a_hub_id_answers_as_with_the_folder(hub, tmp_path):
    """One real server; `--model ORG/NAME@REV` from the cache and `--bundle` from the checkout: same text."""
    cache = hub[0]
    outputs = {}
    with running_server(MODEL / "cloud") as server:
        for name, source in (("hub", ["--model", f"{REPO}@v1"]), ("folder", ["--bundle", str(MODEL / "edge")])):
            proc = subprocess.run([str(BIN / "edge-chat"), "--server", f"127.0.0.1:{server.port}", *source,
                                   "--prompt", PROMPT, "--max-sentences", "2", "--threads", "1"], cwd=tmp_path,
                                  env=_env(cache), capture_output=True, text=True, timeout=120,
                                  stdin=subprocess.DEVNULL)
            assert proc.returncode == 0, f"{name}: {proc.stderr}"
            outputs[name] = proc.stdout
    assert outputs["hub"].strip() and outputs["hub"] == outputs["folder"]


def test_edge_chat_local_serves_the_cloud_half_of_a_hub_id(hub, tmp_path):
    """--local with a hub id: the local server is started on the cached cloud/ (sllm-cloud serve)."""
    proc = subprocess.run([str(BIN / "edge-chat"), "--local", "--model", REPO, "--prompt", PROMPT,
                           "--max-sentences", "2", "--threads", "1", "--json"], cwd=tmp_path, env=_env(hub[0]),
                          capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert '"event": "turn_end"' in proc.stdout


def test_commands_name_a_missing_hub_id_in_one_line(hub, tmp_path):
    for cmd in (["sllm-cloud", "serve", "--model", "sllm-test/missing@v3", "--port", "0"],
                ["edge-chat", "--model", "sllm-test/missing@v3", "--prompt", "Hi."]):
        proc = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=tmp_path, env=_env(hub[0]), capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2, proc.stderr
        errors = proc.stderr.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("error: sllm-test/missing@v3 is no folder here and not "
                                                         "in the local model-hub cache"), proc.stderr


def test_sllm_train_reads_a_hub_id(offline_hub):
    from typer.testing import CliRunner

    from sllm.training.cli import app

    result = CliRunner().invoke(app, ["reconstruct", REPO, "The cat sat on the mat."])
    assert result.exit_code == 0, result.output
    assert "'The cat sat on the mat.' ->" in result.output


def test_a_snapshot_file_linked_outside_its_blob_store_is_refused(hub, tmp_path):
    """Links into the repo's blobs/ are how the hub cache stores files; a link anywhere else is not."""
    import shutil

    from sllm.runtime.manifest import BundleError, read_manifest

    cache = tmp_path / "hub"
    shutil.copytree(hub[0], cache, symlinks=True)
    snapshot = repo_folder(cache, REPO) / "snapshots" / hub[2]
    read_manifest(snapshot / "edge", kind="edge")  # as stored: fine
    (snapshot / "edge" / "encoder.onnx").unlink()
    (snapshot / "edge" / "encoder.onnx").symlink_to(MODEL / "edge" / "encoder.onnx")  # right bytes, wrong place
    with pytest.raises(BundleError, match="encoder.onnx'?, which leads out of the bundle folder"):
        read_manifest(snapshot / "edge", kind="edge")

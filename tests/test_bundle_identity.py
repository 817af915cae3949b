"""A bundle is what its files are, not what its manifest says (issue 14, point 4).

The edge bundle records the sha256 of its cloud half's weights at export; the server reports the
sha256 of the weights it serves; the edge refuses any other cloud model before a turn, whatever
model id it claims. Every file name a manifest gives stays inside the bundle folder. Against a
real server on 127.0.0.1 and the bundled model's real bundles (models/default)."""
import json
import os
import shutil
from pathlib import Path

import pytest
from cloud_helpers import running_server
from helpers import ROOT
from typer.testing import CliRunner

from sllm import edge
from sllm.edge.cli import app
from sllm.modeling.cloud_bundle import load_cloud_bundle, write_random_cloud_bundle
from sllm.runtime.edge_bundle import CLOUD_WEIGHTS_FIELD, load_edge_bundle
from sllm.runtime.files import sha256_file
from sllm.runtime.manifest import BundleError, read_manifest, write_manifest

MODEL = ROOT / "models" / "default"
EDGE = MODEL / "edge"
SHIPPED = json.loads((EDGE / "manifest.json").read_text())


@pytest.fixture(scope="module")
def impostor(tmp_path_factory) -> Path:
    """A cloud bundle of random weights labelled with the bundled model's id and d."""
    out = tmp_path_factory.mktemp("impostor") / "cloud"
    write_random_cloud_bundle(out, model_id=SHIPPED["model_id"], d=SHIPPED["d_model"], layers=1, heads=4,
                              max_sentences=64)
    return out


def _edit(manifest_path: Path, **changes) -> None:
    m = json.loads(manifest_path.read_text())
    for key, value in changes.items():
        if value is None:
            m.pop(key, None)
        else:
            m[key] = value
    manifest_path.write_text(json.dumps(m))


def _edge_copy(tmp_path: Path, **changes) -> Path:
    d = shutil.copytree(EDGE, tmp_path / "edge")
    _edit(d / "manifest.json", **changes)
    return d


def _chat(*args):
    r = CliRunner().invoke(app, ["--threads", "1", *map(str, args)])
    assert "Traceback" not in r.output
    return r


# ---------------------------------------------------------------- identity

def test_the_shipped_edge_bundle_records_its_cloud_weights():
    cloud = read_manifest(MODEL / "cloud", kind="cloud", verify=False)
    assert SHIPPED[CLOUD_WEIGHTS_FIELD] == cloud["files"]["cloud.safetensors"]
    assert SHIPPED[CLOUD_WEIGHTS_FIELD] == sha256_file(MODEL / "cloud" / "cloud.safetensors")
    assert "manifest.json" not in SHIPPED["files"]  # so adding the field left every listed hash valid
    load_edge_bundle(EDGE)


def test_random_weights_under_the_edge_model_id_are_refused(impostor, tmp_path):
    """model id and d agree, the weights do not: edge-chat exits 2 with one line naming both hashes
    (against a server, and with --local before starting one); the API raises EdgeError."""
    theirs = read_manifest(impostor, kind="cloud")["files"]["cloud.safetensors"]
    ours = SHIPPED[CLOUD_WEIGHTS_FIELD]
    assert theirs != ours
    with running_server(impostor, threads=1) as srv:
        r = _chat("--server", f"127.0.0.1:{srv.port}", "--bundle", EDGE, "--prompt", "Hello.")
        assert r.exit_code == 2 and r.stdout == ""
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: the cloud model is not the other half")
        assert theirs in r.stderr and ours in r.stderr and "refusing to chat" in r.stderr
        with pytest.raises(edge.EdgeError, match=f"weights sha256 {theirs}.*cloud weights sha256 {ours}"):
            edge.connect(f"127.0.0.1:{srv.port}", EDGE, threads=1)
        assert srv.service.stats()["sessions_opened_total"] == 0  # refused before any session
    model = tmp_path / "model"
    model.mkdir()
    (model / "edge").symlink_to(EDGE)  # a bundle folder reached through a link is still itself
    (model / "cloud").symlink_to(impostor)
    r = _chat("--local", "--model", model, "--prompt", "Hello.")
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1
    assert "refusing to start" in r.stderr and theirs in r.stderr and ours in r.stderr


def test_an_edge_bundle_without_the_weights_hash_is_refused_until_re_exported(tmp_path):
    """Exported before the field existed: it loads, but chats with no server (re-export it). A
    stage-1 export (no cloud half) chats with none either."""
    old = _edge_copy(tmp_path, **{CLOUD_WEIGHTS_FIELD: None})
    rt = edge.load_runtime(old, threads=1)
    with running_server(MODEL / "cloud", threads=1) as srv:
        with pytest.raises(edge.EdgeError, match="exported before edge bundles recorded .* re-export the bundle"):
            edge.connect(f"127.0.0.1:{srv.port}", rt)
    assert "re-export" in rt.bundle.cloud_mismatch(rt.model_id, rt.d_model, SHIPPED[CLOUD_WEIGHTS_FIELD], "x serves")


def test_the_identity_rule():
    """EdgeBundle.cloud_mismatch, case by case (what a server's ModelInfo or a cloud manifest says)."""
    b = load_edge_bundle(EDGE)
    mid, d, ours = b.model_id, b.d_model, SHIPPED[CLOUD_WEIGHTS_FIELD]
    assert b.cloud_mismatch(mid, d, ours, "the server at h:1 serves") is None
    assert "not halves of the same model" in b.cloud_mismatch("sllm-other", d, ours, "the server at h:1 serves")
    assert "(d=32)" in b.cloud_mismatch(mid, 32, ours, "the server at h:1 serves")
    other = "0" * 64
    msg = b.cloud_mismatch(mid, d, other, "the server at h:1 serves", "refusing to chat")
    assert other in msg and ours in msg and "refusing to chat" in msg
    msg = b.cloud_mismatch(mid, d, "", "the server at h:1 serves", "refusing to chat")
    assert "without the sha256 of its weights" in msg and "update the server" in msg
    b.manifest = {**b.manifest, CLOUD_WEIGHTS_FIELD: None}
    assert "stage-1 export with no cloud half" in b.cloud_mismatch(mid, d, ours, "the server at h:1 serves")


# ---------------------------------------------------------------- file names stay inside the bundle

@pytest.fixture
def small_bundle(tmp_path) -> Path:
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "a.bin").write_bytes(b"a")
    (tmp_path / "outside.bin").write_bytes(b"secret")
    write_manifest(d, {"kind": "test"}, ["a.bin"])
    return d


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "sub/../../outside.bin", "./a.bin", "a\\b",
                                  "C:/x", "", "a//b"])
def test_manifest_file_names_outside_the_folder_are_refused(small_bundle, name):
    digest = sha256_file(small_bundle.parent / "outside.bin")
    _edit(small_bundle / "manifest.json", files={"a.bin": sha256_file(small_bundle / "a.bin"), name: digest})
    for verify in (True, False):  # the names are refused before any file is read
        with pytest.raises(BundleError, match="refusing it"):
            read_manifest(small_bundle, verify=verify)


def test_symlinks_out_of_the_folder_are_refused(small_bundle):
    files = {"a.bin": sha256_file(small_bundle / "a.bin")}
    (small_bundle / "inner.bin").symlink_to("a.bin")  # inside: fine
    _edit(small_bundle / "manifest.json", files={**files, "inner.bin": files["a.bin"]})
    read_manifest(small_bundle)
    (small_bundle / "leak.bin").symlink_to(small_bundle.parent / "outside.bin")  # right hash, wrong place
    _edit(small_bundle / "manifest.json", files={**files, "leak.bin": sha256_file(small_bundle / "leak.bin")})
    with pytest.raises(BundleError, match="leak.bin.*leads out of the bundle folder"):
        read_manifest(small_bundle)
    (small_bundle.parent / "manifest.json").write_text((small_bundle / "manifest.json").read_text())
    os.replace(small_bundle / "manifest.json", small_bundle / "old.json")
    (small_bundle / "manifest.json").symlink_to(small_bundle.parent / "manifest.json")
    with pytest.raises(BundleError, match="manifest.json is a link to .* outside the bundle folder"):
        read_manifest(small_bundle, verify=False)


def test_edge_bundle_file_fields_stay_inside(tmp_path):
    """encoder_file & co. must be listed files, themselves inside; edge-chat says so in one line."""
    shutil.copytree(EDGE, tmp_path / "elsewhere")
    files = {**SHIPPED["files"], "../elsewhere/encoder.onnx": SHIPPED["files"]["encoder.onnx"]}
    bad = _edge_copy(tmp_path, encoder_file="../elsewhere/encoder.onnx", files=files)
    with pytest.raises(BundleError, match="'../elsewhere/encoder.onnx', which is not a plain relative name"):
        load_edge_bundle(bad)
    r = _chat("--bundle", bad, "--prompt", "Hello.")
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1 and "refusing it" in r.stderr
    _edit(bad / "manifest.json", encoder_file="encoder.onnx", files=SHIPPED["files"], decoder_file="/etc/passwd")
    with pytest.raises(BundleError, match="decoder_file '/etc/passwd' is not among the manifest's files"):
        load_edge_bundle(bad)
    unlisted = {k: v for k, v in SHIPPED["files"].items() if k != "tokenizer_meta.json"}
    _edit(bad / "manifest.json", decoder_file="decoder.onnx", files=unlisted)
    with pytest.raises(BundleError, match="does not list tokenizer_meta.json"):
        load_edge_bundle(bad)


def test_the_cloud_bundle_reader_refuses_names_outside_and_unlisted_weights(tmp_path):
    cloud = tmp_path / "cloud"
    write_random_cloud_bundle(cloud, d=16, layers=1, heads=2, max_sentences=8)
    m = read_manifest(cloud, kind="cloud")
    shutil.copy(cloud / "cloud.safetensors", tmp_path / "weights.safetensors")
    _edit(cloud / "manifest.json", files={"opt_config.json": m["files"]["opt_config.json"]})
    with pytest.raises(BundleError, match="does not list cloud.safetensors"):
        load_cloud_bundle(cloud)  # the weights would be loaded unchecked
    _edit(cloud / "manifest.json", files={**m["files"], "../weights.safetensors": m["files"]["cloud.safetensors"]})
    with pytest.raises(BundleError, match="refusing it"):
        load_cloud_bundle(cloud)
    (cloud / "cloud.safetensors").unlink()
    (cloud / "cloud.safetensors").symlink_to(tmp_path / "weights.safetensors")
    _edit(cloud / "manifest.json", files=m["files"])
    with pytest.raises(BundleError, match="cloud.safetensors.*leads out of the bundle folder"):
        load_cloud_bundle(cloud)

"""`export`: checkpoint -> edge bundle (ONNX) + cloud bundle, proven equal to torch."""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import ROOT
from typer.testing import CliRunner

from sllm.export.cli import app
from sllm.export.exporter import ExportError, VerificationFailed, check_output_dir, export_checkpoint
from sllm.modeling.cloud_bundle import load_cloud_bundle, model_id_for
from sllm.modeling.generate import decode_sentences
from sllm.runtime.artifacts import CheckpointError
from sllm.runtime.edge_bundle import load_edge_bundle
from sllm.runtime.manifest import BundleError, read_manifest
from sllm.runtime.svae_onnx import decoder_step
from sllm.training.load import load_sllm

N_VERIFY = 40
runner = CliRunner()


@pytest.fixture(scope="module")
def exported(sllm_run, tmp_path_factory):
    """The SLLM exported in fp32 (the default)."""
    steps = []
    result = export_checkpoint(sllm_run, tmp_path_factory.mktemp("x_out") / "bundle", n_verify=N_VERIFY,
                               progress=steps.append)
    assert steps == ["load", "export encoder", "export decoder", "verify", "write"]
    return result


def _ckpt(run: Path) -> Path:
    return run / (run / "latest").read_text().strip()


def _copy_with_config(run: Path, dest: Path, edit) -> Path:
    """A copy of the run's checkpoint whose config.json went through `edit`, manifest re-hashed."""
    d = shutil.copytree(_ckpt(run), dest)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["sha256"]["config.json"] = hashlib.sha256((d / "config.json").read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


# ---------------------------------------------------------------- the export and its proofs

def test_export_writes_edge_and_cloud_bundles_of_one_model(exported, sllm_run):
    edge, cloud = read_manifest(exported.edge, kind="edge"), read_manifest(exported.cloud, kind="cloud")
    model_id = model_id_for(_ckpt(sllm_run))
    assert edge["model_id"] == cloud["model_id"] == model_id
    assert edge["d_model"] == cloud["d_model"] == 32
    trained = load_sllm(sllm_run)
    cfg = trained.model.svae.cfg
    assert (edge["vocab_size"], edge["pad_id"], edge["bos_id"], edge["eos_id"]) == (
        cfg.vocab_size, cfg.pad_id, cfg.bos_id, cfg.eos_id)
    assert edge["max_sentence_tokens"] == 16
    assert (edge["n_layers"], edge["n_heads"], edge["head_dim"]) == (1, 2, 16)
    assert edge["segmentation_version"] and edge["split_on_comma"] is True
    assert set(edge["files"]) == {"encoder.onnx", "decoder.onnx", "sentence.onnx", "tokenizer.json",
                                  "tokenizer_meta.json", "report.json", "report.md"}
    assert edge["sentence_file"] == "sentence.onnx"
    assert edge["quantization"] == {"encoder": "fp32", "decoder": "fp32"}
    # the cloud half's identity: the hash of the weights it was exported with, beyond the model id
    weights = hashlib.sha256((exported.cloud / "cloud.safetensors").read_bytes()).hexdigest()
    assert edge["cloud_weights_sha256"] == cloud["files"]["cloud.safetensors"] == weights
    report = json.loads((exported.edge / "report.json").read_text())
    assert report["passed"] and report["greedy"]["identical"] == report["greedy"]["sentences"] == N_VERIFY
    # the one-call sentence graph decodes what torch decodes, repetition controls off and on
    sentence = report["sentence_graph"]
    assert sentence["ok"] and sentence["sentences"] == N_VERIFY
    assert sentence["controls_off"]["identical"] == sentence["controls_on"]["identical"] == N_VERIFY
    assert "PASSED" in (exported.edge / "report.md").read_text()
    assert report["cloud"]["reloaded_identical"]
    # the cloud half is the trained OPT blocks + termination head, bit for bit
    opt, _ = load_cloud_bundle(exported.cloud)
    ref = trained.model.opt.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in opt.state_dict().items())
    assert not any(p.name.startswith(".") for p in exported.out.iterdir())  # no temp folders left


def test_one_loader_opens_every_kind(exported, stage1, sllm_run, tmp_path):
    from sllm.modeling.opt_graft import GraftedOPT
    from sllm.runtime.artifacts import identify
    from sllm.runtime.edge_bundle import EdgeBundle
    from sllm.training.load import ExportFolder, TrainedSentenceVAE, TrainedSLLM, load, load_sentence_vae

    kinds = {p: identify(p).kind for p in (stage1, _ckpt(stage1), sllm_run, exported.edge, exported.cloud,
                                           exported.out)}
    assert list(kinds.values()) == ["sentence_vae", "sentence_vae", "sllm", "edge", "cloud", "export"]
    assert identify(sllm_run).path == _ckpt(sllm_run)  # a run dir means its newest checkpoint
    assert isinstance(load(stage1), TrainedSentenceVAE) and isinstance(load(sllm_run), TrainedSLLM)
    assert isinstance(load(exported.edge), EdgeBundle)
    opt, manifest = load(exported.cloud)
    assert isinstance(opt, GraftedOPT) and manifest["model_id"] == exported.report["model_id"]
    folder = load(exported.out)
    assert isinstance(folder, ExportFolder) and folder.edge.model_id == folder.cloud[1]["model_id"]
    assert folder.baseline is None
    # the SentenceVAE inside an SLLM checkpoint is what its edge bundle runs
    assert load_sentence_vae(sllm_run).model.cfg.d_model == folder.edge.d_model
    for path, why in ((tmp_path / "missing", "no such"), (tmp_path, "neither a checkpoint nor a bundle")):
        with pytest.raises(CheckpointError, match=why):
            load(path)


def test_onnx_checker_and_dynamic_axes(exported):
    enc, dec = onnx.load(exported.edge / "encoder.onnx"), onnx.load(exported.edge / "decoder.onnx")
    for m in (enc, dec, onnx.load(exported.edge / "sentence.onnx")):
        onnx.checker.check_model(m, full_check=True)
        assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 18
        assert not m.graph.initializer or all(not t.external_data for t in m.graph.initializer)

    def dims(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    ins, outs = dims(enc.graph.input), dims(enc.graph.output)
    assert all(isinstance(x, str) for x in ins["ids"]) and ins["ids"] == ins["mask"]
    assert isinstance(outs["vectors"][0], str) and outs["vectors"][1] == 32
    ins, outs = dims(dec.graph.input), dims(dec.graph.output)
    assert all(isinstance(x, str) for x in ins["ids"])
    kv = ins["past_kv"]
    assert kv[0:2] == [1, 2] and isinstance(kv[2], str) and kv[3] == 2 and isinstance(kv[4], str) and kv[5] == 16
    assert isinstance(outs["present_kv"][4], str)


def test_ort_equals_torch_at_many_sizes(exported, sllm_run):
    """Independent of the report: random and real inputs, batch 1..5, lengths 1..max, past 0..max."""
    svae = load_sllm(sllm_run).model.svae.eval()
    b = load_edge_bundle(exported.edge)
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    with torch.inference_mode():
        for B, L in [(1, 1), (2, 3), (5, 16)]:
            ids = torch.randint(0, 300, (B, L), generator=g)
            mask = torch.arange(L)[None] < torch.randint(1, L + 1, (B,), generator=g)[:, None]
            got = b.encoder.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0]
            worst = max(worst, float(np.abs(got - svae.encoder(ids, mask).numpy()).max()))
        for B, T, P in [(1, 1, 0), (2, 1, 0), (3, 4, 0), (1, 1, 16), (4, 1, 6), (2, 5, 3), (2, 17, 0)]:
            ids = torch.randint(0, 300, (B, T), generator=g)
            mem = torch.randn(B, 32, generator=g)
            past = torch.randn(1, 2, B, 2, P, 16, generator=g)
            ref_logits, ref_kv = svae.decoder(ids, mem, past)
            logits, kv = decoder_step(b.decoder, ids.numpy(), mem.numpy(), past.numpy())
            assert kv.shape == (1, 2, B, 2, P + T, 16)
            worst = max(worst, float(np.abs(logits - ref_logits.numpy()).max()),
                        float(np.abs(kv - ref_kv.numpy()).max()))
    assert worst < 1e-4
    report = json.loads((exported.edge / "report.json").read_text())
    assert all(c["ok"] for c in report["parity"]) and len(report["parity"]) >= 20
    assert {c["inputs"] for c in report["parity"]} >= {"random", "real", "real, teacher-forced", "real, cached steps"}
    assert max(report["parity_max"].values()) < 1e-4


def test_ort_greedy_tokens_identical_to_torch(exported, sllm_run):
    from sllm.export.exporter import load_checkpoint, verification_sentences

    loaded = load_checkpoint(sllm_run)
    sentences, source = verification_sentences(loaded, N_VERIFY)
    assert len(sentences) == N_VERIFY and "validation" in source
    b = load_edge_bundle(exported.edge)
    ours = b.decode_vectors(b.encode_ids(sentences))
    svae = loaded.svae
    with torch.inference_mode():
        ref = []
        for s in range(0, len(sentences), 7):  # other batch sizes than the exporter's
            chunk = sentences[s : s + 7]
            ids = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)
            for r, t in enumerate(chunk):
                ids[r, : len(t)] = torch.tensor(t)
            mask = torch.arange(ids.shape[1])[None] < torch.tensor([len(t) for t in chunk])[:, None]
            ref += decode_sentences(svae.decoder, svae.encode(ids, mask), 16)
    assert ours == ref
    # batch 1 too (the edge decodes one sentence at a time)
    assert [b.decode_vectors(b.encode_ids([s]))[0] for s in sentences[:5]] == ref[:5]
    assert any(len(t) > 0 for t in ours)


def test_edge_bundle_loads_without_torch(exported):
    code = (
        "import sys, numpy as np\n"
        "from runtime.edge_bundle import load_edge_bundle\n"
        f"b = load_edge_bundle({str(exported.edge)!r})\n"
        "ids = b.tokenizer.encode('The king sees the river.')\n"
        "v = b.encode_ids([ids])\n"
        "out = b.decode_vectors(v)\n"
        "assert v.shape == (1, b.d_model) and isinstance(out[0], list)\n"
        "bad = [m for m in ('torch', 'transformers', 'training') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok', b.model_id)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok sllm-")


def test_a_flipped_byte_is_refused_on_load(exported, tmp_path):
    edge, cloud = shutil.copytree(exported.edge, tmp_path / "edge"), shutil.copytree(exported.cloud, tmp_path / "cloud")
    load_edge_bundle(edge)
    for path, load in ((edge / "decoder.onnx", load_edge_bundle), (edge / "tokenizer.json", load_edge_bundle),
                       (cloud / "cloud.safetensors", load_cloud_bundle)):
        original = path.read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(BundleError, match="does not match its manifest hash"):
            load(path.parent)
        path.write_bytes(original)
        load(path.parent)
    # a manifest whose sizes do not describe the graphs (hashes re-done) is refused as well
    from sllm.runtime.manifest import write_manifest

    m = read_manifest(edge)
    write_manifest(edge, {**{k: v for k, v in m.items() if k not in ("files", "format_version")}, "head_dim": 8},
                   list(m["files"]))
    with pytest.raises(BundleError, match="do not match the manifest"):
        load_edge_bundle(edge)
    (edge / "encoder.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_edge_bundle(edge)
    with pytest.raises(BundleError, match="not 'edge'"):
        load_edge_bundle(cloud)


# ---------------------------------------------------------------- refusals and the CLI

def _cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def test_refusals_are_clear_errors_with_exit_2(exported, stage1, sllm_run, tmp_path):
    # not a checkpoint at all
    (tmp_path / "junk").mkdir()
    r = _cli(tmp_path / "junk", "--out", tmp_path / "o1")
    assert r.exit_code == 2 and "error:" in r.output and "neither a checkpoint" in r.output
    r = _cli(tmp_path / "missing", "--out", tmp_path / "o1")
    assert r.exit_code == 2 and "no such folder" in r.output
    # a checkpoint of another kind
    other = _copy_with_config(stage1, tmp_path / "other", lambda c: c.update(kind="reward_model"))
    r = _cli(other, "--out", tmp_path / "o1")
    assert r.exit_code == 2 and "'reward_model' checkpoint" in r.output and "SentenceVAE" in r.output
    # labelled a token-level baseline (exported to OUT/baseline), but it is not one
    other = _copy_with_config(stage1, tmp_path / "baseline", lambda c: c.update(kind="opt_baseline"))
    r = _cli(other, "--out", tmp_path / "o1")
    assert r.exit_code == 2 and "token-level baseline" in r.output and not (tmp_path / "o1" / "baseline").exists()
    # incompatible configs: an impossible one, one that does not fit the weights, another segmentation
    bad = _copy_with_config(stage1, tmp_path / "heads", lambda c: c["model"].update(n_heads=3))
    r = _cli(bad, "--out", tmp_path / "o1")
    assert r.exit_code == 2 and "not divisible" in r.output
    bad = _copy_with_config(stage1, tmp_path / "width", lambda c: c["model"].update(ffn_dim=48))
    r = _cli(bad, "--out", tmp_path / "o1")
    assert r.exit_code == 2 and "do not match the config" in r.output
    bad = _copy_with_config(stage1, tmp_path / "seg", lambda c: c["data"].update(segmentation_version="seg-v0"))
    r = _cli(bad, "--out", tmp_path / "o1")
    assert r.exit_code == 2 and "segmentation 'seg-v0'" in r.output
    # an output folder holding a different model; a folder of unrelated files
    r = _cli(stage1, "--out", exported.out)
    assert r.exit_code == 2 and "holds a different model" in r.output and "--force" in r.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    r = _cli(stage1, "--out", tmp_path / "busy")
    assert r.exit_code == 2 and "not empty" in r.output
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
    # bad options
    assert _cli(stage1, "--out", tmp_path / "o2", "--quantize", "int4").exit_code == 2
    assert _cli(stage1, "--out", tmp_path / "o2", "--n-verify", "0").exit_code == 2
    assert _cli(stage1, "--out", tmp_path / "o2", "--weights", "best").exit_code == 2
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # the same model may be re-exported in place; --force lets a different one replace it
    assert check_output_dir(exported.out, read_manifest(exported.edge)["model_id"], force=False) == []
    with pytest.raises(ExportError, match="different model"):
        check_output_dir(exported.out, "sllm-0000000000000000", force=False)
    notes = check_output_dir(exported.out, "sllm-0000000000000000", force=True)
    assert len(notes) == 2 and all("--force" in n for n in notes)


def test_failed_verification_installs_nothing(stage1, tmp_path, monkeypatch):
    import sllm.export.verify as verify

    monkeypatch.setattr(verify, "ATOL", -1.0)  # nothing can pass
    with pytest.raises(VerificationFailed, match="nothing was installed"):
        export_checkpoint(stage1, tmp_path / "out", n_verify=4)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["export-failed-report.json",
                                                                     "export-failed-report.md"]
    assert not json.loads((tmp_path / "out" / "export-failed-report.json").read_text())["passed"]


def test_cli_stage1_int8_exports_edge_only_with_numbers(stage1, tmp_path):
    out = tmp_path / "out"
    r = _cli(stage1, "--out", out, "--quantize", "int8", "--n-verify", 30)
    assert r.exit_code == 0, r.output
    assert "PASSED" in r.output and "int8" in r.output and "no cloud bundle" in r.output
    assert not (out / "cloud").exists()
    edge = read_manifest(out / "edge", kind="edge")
    assert edge["quantization"] == {"encoder": "int8", "decoder": "int8"}
    assert edge["cloud_weights_sha256"] is None  # no cloud half: it chats with no cloud model
    assert edge["encoder_file"] == "encoder.int8.onnx" and edge["decoder_file"] == "decoder.int8.onnx"
    assert not (out / "edge" / "decoder.onnx").exists()
    q = json.loads((out / "edge" / "report.json").read_text())["quantization"]
    for key in ("exact_match_fp32", "exact_match_int8", "same_tokens_as_fp32", "decode_speedup", "encode_speedup",
                "vectors_min_cosine"):
        assert 0 <= q[key] < float("inf"), key
    assert q["speed_fp32"]["decode_ms_per_step"] > 0 and q["speed_int8"]["decode_ms_per_step"] > 0
    assert q["sizes"]["decoder"]["int8"] < q["sizes"]["decoder"]["fp32"]
    b = load_edge_bundle(out / "edge")
    assert len(b.decode_vectors(b.encode_ids([[5, 6, 7]]))) == 1

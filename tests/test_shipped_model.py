"""A complete exported model (issue 18): the torch SentenceVAE recovered from an edge bundle's ONNX
graphs (svae/), an export folder that `sllm-train eval|reconstruct|generate|compare` and a stage-2
run take, the stop head refit with its threshold stored in the edge manifest; and the shipped
models/default itself, evaluated from the repository."""
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import ROOT, sllm_overrides, train_run
from typer.testing import CliRunner

from sllm.edge.runtime import EdgeRuntime
from sllm.modeling.cloud_bundle import load_cloud_bundle
from sllm.modeling.sllm_generate import SLLMGenerator
from sllm.runtime.edge_bundle import load_edge_bundle
from sllm.runtime.manifest import cloud_weights_sha256, read_manifest
from sllm.training.cli import app
from sllm.training.config import SLLMRunConfig
from sllm.training.load import load, load_sentence_vae, load_sllm
from sllm.training.stop_head import validation_stop_threshold
from sllm.training.svae_folder import (
    compare_with_graphs,
    validation_token_lists,
)
from sllm.training.svae_from_onnx import RecoveryError, recover_sentence_vae
from sllm.training.tasks.sllm import SLLMTask

MODEL = ROOT / "models" / "default"
runner = CliRunner()


@pytest.fixture(scope="module")
def exported(sllm_export):
    """The tiny SLLM exported: edge/ + cloud/ + svae/ (the exported SentenceVAE in float32)."""
    return sllm_export


def test_the_exported_svae_folder_is_the_exported_one(exported, sllm_run):
    """svae/ holds the checkpoint's SentenceVAE bit for bit, and it reproduces the graphs (ORT) token
    for token. The fused graphs (modeling.fused_onnx) fold the cross-attention's weights, so they no longer
    map back onto a SentenceVAE: recovery from graphs is for bundles exported before svae/ existed."""
    ours = load_sentence_vae(exported).model
    trained = load_sllm(sllm_run)
    theirs = trained.model.svae.state_dict()
    assert ours.cfg == trained.model.svae.cfg
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    sentences = validation_token_lists(trained.run.data, trained.tokenizer, ours.cfg.max_sentence_tokens, 40)
    check = compare_with_graphs(ours, load_edge_bundle(exported / "edge"), sentences)
    assert check["within_tolerance"] and check["greedy_identical"] == check["sentences"] == len(sentences)
    source = json.loads((exported / "svae" / "source.json").read_text())
    assert source["model_id"] == read_manifest(exported / "edge", kind="edge")["model_id"]
    with pytest.raises(RecoveryError):
        recover_sentence_vae(exported / "edge")


def test_the_export_chose_the_stop_threshold_on_validation(exported, sllm_run):
    """sllm-export stores the head's max-F1 threshold of the validation split in the edge manifest."""
    trained = load_sllm(sllm_run)
    choice = validation_stop_threshold(trained.model, trained.run.data, trained.path)
    edge = read_manifest(exported / "edge", kind="edge")
    assert choice is not None and edge["stop_threshold"] == choice["threshold"]
    assert edge["stop_head"]["precision"] == round(choice["precision"], 4)
    assert EdgeRuntime.load(exported / "edge", threads=1).bundle.stop_threshold == choice["threshold"]


def test_the_export_folder_loads_as_the_trained_model(exported, sllm_run):
    svae = load_sentence_vae(exported)
    ref = load_sllm(sllm_run)
    assert all(torch.equal(v, ref.model.svae.state_dict()[k]) for k, v in svae.model.state_dict().items())
    sllm = load_sllm(exported)
    assert sllm.stop_threshold == read_manifest(exported / "edge", kind="edge").get("stop_threshold")
    assert all(torch.equal(v, ref.model.state_dict()[k]) for k, v in sllm.model.state_dict().items())
    gen, ref_gen = (SLLMGenerator(t.model, t.tokenizer, t.run.data.split_on_comma) for t in (sllm, ref))
    prompt = "The king sees the river. My sister finds a letter,"
    assert [s.ids for s in gen.generate(prompt, 4)] == [s.ids for s in ref_gen.generate(prompt, 4)]
    assert load(exported).svae is not None


def test_sllm_train_commands_take_the_export_folder(exported):
    res = runner.invoke(app, ["eval", str(exported), "--n-exact", "10", "--n-loss", "20"])
    assert res.exit_code == 0, res.output
    assert "exact-match reconstruction (10 sentences)" in res.output
    res = runner.invoke(app, ["reconstruct", str(exported), "The king sees the river."])
    assert res.exit_code == 0 and "pieces reconstructed exactly" in res.output, res.output
    res = runner.invoke(app, ["generate", str(exported), "The king sees the river.", "--max-sentences", "3",
                              "--repetition-penalty", "1.3", "--no-repeat-sentence"])
    assert res.exit_code == 0 and res.output.strip(), res.output


def test_a_foreign_svae_folder_is_refused(exported, tmp_path):
    other = tmp_path / "model"
    shutil.copytree(exported, other)
    source = json.loads((other / "svae" / "source.json").read_text())
    source["model_id"] = "sllm-someone-else"
    (other / "svae" / "source.json").write_text(json.dumps(source))
    res = runner.invoke(app, ["eval", str(other), "--n-exact", "5", "--n-loss", "5"])
    assert res.exit_code == 2 and "not the same export" in res.output
    shutil.rmtree(other / "svae")
    res = runner.invoke(app, ["eval", str(other), "--n-exact", "5", "--n-loss", "5"])
    assert res.exit_code == 2 and "recover-svae" in res.output


def test_a_stage2_run_starts_from_the_export_folder(exported, tiny_corpus, tmp_path):
    overrides = sllm_overrides(tiny_corpus, tmp_path / "cache") + [f"sllm.svae_checkpoint={exported}",
                                                                   "train.max_steps=2"]
    task = train_run(SLLMRunConfig, SLLMTask, overrides, tmp_path / "run")
    start = task.build_model().svae.state_dict()
    shipped = load_sentence_vae(exported).model.state_dict()
    assert all(torch.equal(v, shipped[k]) for k, v in start.items())
    assert task.run.data.tokenizer == str(exported / "svae")
    assert (tmp_path / "run" / "latest").is_file()


def test_refit_stop_writes_both_manifests_consistently(exported, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(exported, model)
    before, _ = load_cloud_bundle(model / "cloud")
    res = runner.invoke(app, ["refit-stop", str(model), "--positive-weight", "5", "--train-passages", "30",
                              "--cache-dir", str(tmp_path / "cache"), "--report", str(tmp_path / "stop")])
    assert res.exit_code == 0, res.output
    after, cloud = load_cloud_bundle(model / "cloud")
    edge = read_manifest(model / "edge", kind="edge")
    assert edge["cloud_weights_sha256"] == cloud_weights_sha256(cloud) != \
        read_manifest(exported / "edge", kind="edge")["cloud_weights_sha256"]
    assert 0 <= edge["stop_threshold"] <= 1 and edge["stop_head"]["positive_weight"] == 5
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed and all(k.startswith("stop_head.") for k in changed)  # only the head moved
    rt = EdgeRuntime.load(model / "edge", threads=1)  # hashes and graphs still check out
    assert rt.bundle.stop_threshold == edge["stop_threshold"]
    assert rt.bundle.cloud_mismatch(cloud["model_id"], cloud["d_model"], cloud_weights_sha256(cloud), "x") is None
    report = json.loads((tmp_path / "stop.json").read_text())
    assert report["after"]["chosen"]["threshold"] == edge["stop_threshold"]


# ---------------------------------------------------------------- the shipped model

def test_eval_the_shipped_model_from_the_repository(tmp_path, monkeypatch):
    """`sllm-train eval models/default` (a fast variant), from another folder than the checkout: its
    svae/ loads, names no path of the training machine, and reconstructs short validation sentences."""
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["eval", str(MODEL), "--n-exact", "60", "--n-loss", "100",
                              "--report", str(tmp_path / "eval.md")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["metrics"]["exact_match_le16"] >= 0.4, report  # the model card's figure on 2,000 sentences is higher
    assert "| 1 | Hello, |" in res.output  # the paper's Table 2 inputs


def test_the_shipped_svae_matches_the_shipped_graphs():
    """models/default/svae holds the exported SentenceVAE: the edge's graphs (ONNX Runtime) reproduce it
    within the exporter's tolerance and decode validation sentences token for token as it does."""
    source = json.loads((MODEL / "svae" / "source.json").read_text())
    edge = read_manifest(MODEL / "edge", kind="edge")
    assert source["model_id"] == edge["model_id"] and source["dtype"] == "float32"
    report = json.loads((MODEL / "edge" / "report.json").read_text())
    assert report["passed"] and report["sentence_graph"]["ok"]
    trained = load_sentence_vae(MODEL)
    sentences = validation_token_lists(trained.run.data, trained.tokenizer, trained.model.cfg.max_sentence_tokens, 50)
    check = compare_with_graphs(trained.model, load_edge_bundle(MODEL / "edge"), sentences)
    assert check["within_tolerance"] and check["greedy_identical"] == check["sentences"] == len(sentences)


def test_the_shipped_model_compares_with_its_baseline():
    res = runner.invoke(app, ["compare", str(MODEL), "--n-passages", "3"])
    assert res.exit_code == 0, res.output
    assert "| SLLM |" in res.output and "| baseline OPT |" in res.output
    assert np.isfinite(float(res.output.split("| SLLM |")[1].split("|")[1]))  # its PPL

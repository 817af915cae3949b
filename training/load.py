"""One loader for everything a training run or an export leaves behind.

    load(path)    any checkpoint (or run dir), bundle or export folder -> the trained model in torch
                  (TrainedSentenceVAE, TrainedSLLM, TrainedBaseline, a cloud bundle's GraftedOPT, a
                  baseline bundle, or an export folder's halves)
    load_sentence_vae(path)   the SentenceVAE of a stage-1 checkpoint, or the fine-tuned one inside an
                  SLLM checkpoint or an export folder: what an edge bundle exported from it encodes
                  and decodes with
    load_sllm(path), load_baseline(path)   also take an export folder that holds svae/ (the SLLM:
                  svae/ + cloud/, with the edge's stop threshold) and baseline/ (models/default)

Every refusal is a CheckpointError (or BundleError) that says what was found and what was expected;
the kind of a path is decided once, by `sllm.runtime.artifacts.identify`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import OPTForCausalLM

from sllm.modeling.config import ConfigError, OPTSpec
from sllm.modeling.opt_graft import GraftedOPT, read_opt_config
from sllm.modeling.sentence_vae import SentenceVAE
from sllm.modeling.sllm import SLLM
from sllm.modeling.weights import load_state_into, load_tensors, with_tied
from sllm.runtime.artifacts import EXPORT, Artifact, CheckpointError, expect, identify
from sllm.sentences.sampling import StopCalibration
from sllm.sentences.tokenizer import SentenceTokenizer, TokenizerError
from sllm.training.checkpoint import verify_checkpoint_dir
from sllm.training.config import BaselineRunConfig, RunConfig, SLLMRunConfig, load_run_config

OPT_CONFIG_FILE = "opt_config.json"
WEIGHTS = ("ema", "model")


@dataclass
class TrainedSentenceVAE:
    model: SentenceVAE
    tokenizer: SentenceTokenizer
    run: RunConfig
    path: Path


@dataclass
class TrainedSLLM:
    model: SLLM
    tokenizer: SentenceTokenizer
    run: SLLMRunConfig
    path: Path
    stop_threshold: float | None = None  # an export's (its edge manifest's); None: the head's argmax
    tokenizer_dir: Path | None = None  # where its tokenizer files are, when not in `path` (an export's svae/)
    stop_calibration: StopCalibration | None = None  # an export's (its edge manifest's); None: raw P(stop)


@dataclass
class TrainedBaseline:
    model: OPTForCausalLM
    tokenizer: SentenceTokenizer
    run: BaselineRunConfig
    path: Path


def open_checkpoint(path: str | Path, kind: str) -> tuple[Path, object, SentenceTokenizer]:
    """(checkpoint dir, run config, tokenizer) after checking kind, hashes and config."""
    d = expect(path, kind).path
    verify_checkpoint_dir(d)
    try:
        run = load_run_config(d / "config.json")
        run.validate()
    except ConfigError as e:
        raise CheckpointError(f"{d}/config.json: {e}") from None
    try:
        tok = SentenceTokenizer.load(d)
    except TokenizerError as e:
        raise CheckpointError(f"{d}: {e}") from None
    return d, run, tok


def _check_tokenizer(d: Path, tok: SentenceTokenizer, vocab_size: int, pad: int, bos: int, eos: int) -> None:
    if (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) != (vocab_size, pad, bos, eos):
        raise CheckpointError(
            f"{d}: tokenizer (vocab {tok.vocab_size}, pad/bos/eos {tok.pad_id}/{tok.bos_id}/{tok.eos_id}) does not "
            f"match the model (vocab {vocab_size}, pad/bos/eos {pad}/{bos}/{eos})")


def _load_weights(model, d: Path, weights: str) -> None:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    load_state_into(model, with_tied(model, load_tensors(d / f"{weights}.safetensors")), str(d))


def _opt_config(d: Path):
    try:
        return read_opt_config(d / OPT_CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_stage1(path: str | Path, weights: str = "ema", device: str = "cpu") -> TrainedSentenceVAE:
    """A stage-1 (SentenceVAE) checkpoint."""
    d, run, tok = open_checkpoint(path, "sentence_vae")
    m = run.model
    _check_tokenizer(d, tok, m.vocab_size, m.pad_id, m.bos_id, m.eos_id)
    model = SentenceVAE(m)
    _load_weights(model, d, weights)
    return TrainedSentenceVAE(model.to(device).eval(), tok, run, d)


def load_sllm(path: str | Path, weights: str = "ema", device: str = "cpu") -> TrainedSLLM:
    """A stage-2 checkpoint, self-contained: config.json, opt_config.json, tokenizer, weights; or an
    export folder with svae/ and cloud/."""
    if identify(path).kind == EXPORT:
        return load_exported_sllm(Path(path), device)
    d, run, tok = open_checkpoint(path, "sllm")
    m = run.svae
    _check_tokenizer(d, tok, m.vocab_size, m.pad_id, m.bos_id, m.eos_id)
    try:
        model = SLLM(SentenceVAE(m), GraftedOPT(_opt_config(d)))
    except ConfigError as e:
        raise CheckpointError(f"{d}: {e}") from None
    _load_weights(model, d, weights)
    return TrainedSLLM(model.to(device).eval(), tok, run, d)


def load_baseline(path: str | Path, weights: str = "ema", device: str = "cpu") -> TrainedBaseline:
    """A token-level OPT baseline checkpoint, a baseline bundle, or an export folder's baseline/."""
    found = identify(path)
    if found.kind in (EXPORT, "baseline"):
        from sllm.modeling.baseline_bundle import FOLDER, load_baseline_bundle

        folder = found.path / FOLDER if found.kind == EXPORT else found.path
        if not folder.is_dir():
            raise CheckpointError(f"{found.path} is an export folder without a baseline ({FOLDER}/)")
        b = load_baseline_bundle(folder)
        return TrainedBaseline(b.model.to(device).eval(), b.tokenizer, BaselineRunConfig(), folder)
    d, run, tok = open_checkpoint(path, "opt_baseline")
    model = OPTForCausalLM(_opt_config(d))
    _load_weights(model, d, weights)
    return TrainedBaseline(model.to(device).eval(), tok, run, d)


def load_sentence_vae(path: str | Path, weights: str = "ema", device: str = "cpu") -> TrainedSentenceVAE:
    """The SentenceVAE of a stage-1 checkpoint, the (fine-tuned) one inside an SLLM checkpoint, or an
    export folder's (its svae/)."""
    if identify(path).kind == EXPORT:
        return load_stage1(export_svae_dir(Path(path)), weights, device)
    found = expect(path, "sentence_vae", "sllm")
    if found.kind == "sentence_vae":
        return load_stage1(found.path, weights, device)
    t = load_sllm(found.path, weights, device)
    return TrainedSentenceVAE(t.model.svae, t.tokenizer, RunConfig(model=t.run.svae, data=t.run.data,
                                                                   train=t.run.train), t.path)


def export_svae_dir(folder: Path) -> Path:
    """An export folder's svae/ (training.svae_folder), checked to belong to the same model as its edge/."""
    from sllm.runtime.manifest import read_manifest
    from sllm.training.svae_folder import FOLDER, read_source

    d = folder / FOLDER
    if not d.is_dir():
        raise CheckpointError(f"{folder} holds no torch SentenceVAE ({FOLDER}/): it can be chatted with, not evaluated "
                              "or trained further; recover one with `sllm-train recover-svae` (docs/model-card.md)")
    edge_id = read_manifest(folder / "edge", kind="edge", verify=False).get("model_id")
    ours = read_source(d).get("model_id")
    if ours != edge_id:
        raise CheckpointError(f"{d} belongs to model {ours}, but {folder / 'edge'} holds {edge_id}: not the same "
                              "export")
    return d


def load_exported_sllm(folder: Path, device: str = "cpu") -> TrainedSLLM:
    """An export folder as one torch SLLM: svae/ (the SentenceVAE) + cloud/ (the grafted OPT), its
    run config from svae/config.json, the stop threshold of its edge manifest."""
    from sllm.modeling.cloud_bundle import load_cloud_bundle
    from sllm.runtime.edge_bundle import check_stop_calibration, check_stop_threshold
    from sllm.runtime.manifest import read_manifest

    svae = load_stage1(export_svae_dir(folder), device=device)
    opt, cloud = load_cloud_bundle(folder / "cloud", device)
    edge = read_manifest(folder / "edge", kind="edge", verify=False)
    if cloud.get("model_id") != edge.get("model_id"):
        raise CheckpointError(f"{folder}: cloud/ holds {cloud.get('model_id')}, edge/ {edge.get('model_id')}")
    c = opt.config
    spec = OPTSpec(hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                   num_attention_heads=c.num_attention_heads, ffn_dim=c.ffn_dim,
                   max_position_embeddings=c.max_position_embeddings)
    run = SLLMRunConfig(svae=svae.run.model, opt=spec, data=svae.run.data, train=svae.run.train)
    try:
        model = SLLM(svae.model, opt)
    except ConfigError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    threshold = check_stop_threshold(folder / "edge", edge)
    return TrainedSLLM(model.to(device).eval(), svae.tokenizer, run, folder, threshold, svae.path,
                       check_stop_calibration(folder / "edge", edge))


@dataclass
class ExportFolder:
    """An export folder's halves, each loaded as its own kind (absent halves are None)."""

    path: Path
    edge: object  # runtime.edge_bundle.EdgeBundle
    cloud: tuple | None  # (GraftedOPT, manifest)
    baseline: object | None  # modeling.baseline_bundle.LoadedBaseline
    svae: TrainedSentenceVAE | None = None  # its torch SentenceVAE (svae/), when it ships one


def load(path: str | Path, weights: str = "ema", device: str = "cpu"):
    """Whatever `path` holds, loaded: see the module docstring. `weights` applies to checkpoints."""
    found: Artifact = identify(path)
    if found.kind == "sentence_vae":
        return load_stage1(found.path, weights, device)
    if found.kind == "sllm":
        return load_sllm(found.path, weights, device)
    if found.kind == "opt_baseline":
        return load_baseline(found.path, weights, device)
    if found.kind == "cloud":
        from sllm.modeling.cloud_bundle import load_cloud_bundle

        return load_cloud_bundle(found.path, device)
    if found.kind == "baseline":
        from sllm.modeling.baseline_bundle import load_baseline_bundle

        return load_baseline_bundle(found.path)
    if found.kind == "edge":
        from sllm.runtime.edge_bundle import load_edge_bundle

        return load_edge_bundle(found.path)
    assert found.kind == EXPORT
    halves = {name: found.path / name for name in ("edge", "cloud", "baseline")}
    return ExportFolder(found.path, load(halves["edge"]),
                        load(halves["cloud"], device=device) if halves["cloud"].is_dir() else None,
                        load(halves["baseline"]) if halves["baseline"].is_dir() else None,
                        load_sentence_vae(found.path, device=device) if (found.path / "svae").is_dir() else None)

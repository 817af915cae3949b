"""Checkpoint -> OUT/edge (ONNX) + OUT/cloud, verified against torch before anything is installed.

Each bundle is assembled in a hidden temporary folder inside OUT and renamed into place
only after verification passed, so OUT never holds half a bundle or an unverified one.
Nothing in OUT other than edge/ and cloud/ is ever written or removed (a failed
verification leaves its report as OUT/export-failed-report.{json,md}).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime
import onnxscript
import torch

from sllm.export import verify
from sllm.modeling import fused_onnx
from sllm.modeling.fused_onnx import OPSET
from sllm.export.quantize import QUANT_MODES, quantize_int8
from sllm.export.verify import render_markdown
from sllm.modeling.cloud_bundle import load_cloud_bundle, model_id_for, write_cloud_bundle
from sllm.modeling.sllm import SLLM
from sllm.modeling.svae_bundle import FOLDER as SVAE_FOLDER
from sllm.modeling.svae_bundle import load_svae_folder
from sllm.runtime.artifacts import CheckpointError, expect
from sllm.runtime.edge_bundle import (
    CLOUD_WEIGHTS_FIELD,
    STOP_CALIBRATION_FIELD,
    STOP_THRESHOLD_FIELD,
    DECODER,
    DECODER_INT8,
    ENCODER,
    ENCODER_INT8,
    KV_LAYOUT,
    REPORT_JSON,
    REPORT_MD,
    SENTENCE,
    SENTENCE_FIELD,
    TOKENIZER,
    TOKENIZER_META,
    decoder_spec,
    load_edge_bundle,
    write_edge_manifest,
)
from sllm.runtime.files import replace_dir
from sllm.runtime.manifest import BundleError, cloud_weights_sha256, read_manifest
from sllm.runtime.providers import CPU, cpu_session
from sllm.runtime.svae_onnx import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    SENTENCE_INPUTS,
    SENTENCE_OUTPUTS,
)
from sllm.sentences.limit import sentence_token_ids
from sllm.sentences.segment import SEGMENTATION_VERSION
from sllm.training.data.corpus import CorpusError, load_documents, split_documents
from sllm.training.data.sentence_data import segment_documents
from sllm.training.load import load_sllm, load_stage1
from sllm.training.config import RunConfig
from sllm.training.stop_head import validation_stop_calibration, validation_stop_threshold
from sllm.training.svae_folder import write_svae_folder

STEPS = ("load", "export encoder", "export decoder", "verify", "quantize", "write")
# what --quantize int8 converts, per graph: the op types whose weights become int8 (see export.quantize)
QUANTIZED_GRAPHS = {"int8": {"encoder": ("MatMul", "Gather"), "decoder": ("MatMul",)}}
FAILED_REPORT = "export-failed-report"


class ExportError(Exception):
    """A user error: not a SentenceVAE/SLLM checkpoint, an incompatible config, an occupied output folder."""


class VerificationFailed(Exception):
    """The exported graphs do not reproduce torch; nothing was installed. `report` says where."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclass
class LoadedCheckpoint:
    kind: str  # "sllm" or "sentence_vae"
    path: Path
    weights: str
    model_id: str
    svae: object  # SentenceVAE (eval, CPU, fp32)
    opt: object | None  # GraftedOPT, None for a stage-1 checkpoint
    tokenizer: object  # SentenceTokenizer
    data: object  # DataConfig the model was trained with
    train: object  # TrainConfig (recorded with the torch SentenceVAE the export ships in svae/)


@dataclass
class ExportResult:
    out: Path
    edge: Path
    cloud: Path | None
    report: dict
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- refusals

def checkpoint_kind(path: Path, kinds: tuple[str, ...] = ("sllm", "sentence_vae")) -> tuple[Path, str]:
    """(resolved checkpoint dir, its kind, one of `kinds`); ExportError for anything else. The CLI
    also accepts "opt_baseline" (export.baseline_bundle); the SLLM export does not."""
    try:
        found = expect(path, *kinds)
    except CheckpointError as e:
        raise ExportError(f"{e}; export takes a SentenceVAE (stage 1) or SLLM (stage 2) checkpoint, or a "
                          "token-level baseline (opt_baseline)") from None
    return found.path, found.kind


def check_output_dir(out: Path, model_id: str, force: bool) -> list[str]:
    """Refuse (ExportError) an OUT that holds a different model or unrelated files, unless force."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if not out.exists():
        return []
    notes, bundles = [], 0
    for half in ("edge", "cloud"):
        d = out / half
        if not d.exists():
            continue
        problem = None
        try:
            other = read_manifest(d, kind=half, verify=False).get("model_id")
            bundles += 1
            if other != model_id:
                problem = f"{d} holds a different model ({other}; this checkpoint is {model_id})"
        except BundleError as e:
            problem = f"{d} is not a readable {half} bundle ({e})"
        if problem and not force:
            raise ExportError(problem + "; pass --force to replace it")
        if problem:
            notes.append(f"--force: {problem}; it was replaced")
    others = sorted(p.name for p in out.iterdir() if p.name not in ("edge", "cloud") and not p.name.startswith("."))
    others = [n for n in others if not n.startswith(FAILED_REPORT)]
    if others and not bundles and not force:
        raise ExportError(f"--out {out} is not empty and holds no bundle ({', '.join(others[:3])}"
                          f"{', ...' if len(others) > 3 else ''}); choose an empty folder or pass --force "
                          "(only edge/ and cloud/ are written)")
    return notes


def load_checkpoint(path: Path, weights: str = "ema") -> LoadedCheckpoint:
    """Load a stage-1 or stage-2 checkpoint on the CPU in fp32, with clear refusals."""
    if weights not in ("ema", "model"):
        raise ExportError(f"--weights must be 'ema' or 'model', got {weights!r}")
    d, kind = checkpoint_kind(path)
    if not (d / f"{weights}.safetensors").is_file():
        raise ExportError(f"{d} has no {weights}.safetensors")
    try:
        if kind == "sllm":
            t = load_sllm(d, weights=weights)
            svae, opt, cfg_data = t.model.svae, t.model.opt, t.run.data
        else:
            t = load_stage1(d, weights=weights)
            svae, opt, cfg_data = t.model, None, t.run.data
    except (CheckpointError, ValueError) as e:
        raise ExportError(f"cannot export {d}: {e}") from None
    cfg = svae.cfg
    if cfg.max_sentence_tokens < 2:
        raise ExportError(f"{d}: max_sentence_tokens={cfg.max_sentence_tokens}; the exported graphs need >= 2")
    if cfg_data.segmentation_version and cfg_data.segmentation_version != SEGMENTATION_VERSION:
        raise ExportError(f"{d} was trained on segmentation {cfg_data.segmentation_version!r}, but this code "
                          f"segments with {SEGMENTATION_VERSION!r}: the edge would split text differently from "
                          "training; export it with the code version that trained it")
    svae = svae.float().cpu().eval()
    return LoadedCheckpoint(kind, d, weights, model_id_for(d, weights), svae,
                            opt.float().cpu().eval() if opt is not None else None, t.tokenizer, cfg_data, t.run.train)


# ---------------------------------------------------------------- verification sentences

def _pick(token_lists: list[list[int]], n: int) -> list[list[int]]:
    if not token_lists:
        return []
    index = np.unique(np.linspace(0, len(token_lists) - 1, num=min(n, len(token_lists))).astype(np.int64))
    return [token_lists[i] for i in index]


def verification_sentences(loaded: LoadedCheckpoint, n: int, sentences_file: Path | None = None,
                           seed: int = 0) -> tuple[list[list[int]], str]:
    """(n token lists, where they came from): the checkpoint's validation split, topped up from
    its training documents if short; a text file if given; random ids if the corpus is gone."""
    tok, cfg, data = loaded.tokenizer, loaded.svae.cfg, loaded.data
    limit = cfg.max_sentence_tokens
    if sentences_file is not None:
        try:
            text = Path(sentences_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ExportError(f"cannot read --sentences {sentences_file}: {e}") from None
        ids = sentence_token_ids(text, tok, limit, data.split_on_comma)
        if not ids:
            raise ExportError(f"--sentences {sentences_file} holds no sentence")
        picked = _pick(ids, n)
        return picked, f"from {sentences_file}"
    try:
        docs = load_documents(data.corpus or None)
        train, val = split_documents(docs, data.val_fraction, data.split_seed)
    except (CorpusError, OSError, ValueError) as e:
        rng = np.random.default_rng(seed)
        specials = {cfg.pad_id, cfg.bos_id, cfg.eos_id}
        pool = np.array([i for i in range(cfg.vocab_size) if i not in specials])
        ids = [rng.choice(pool, size=int(rng.integers(1, limit + 1))).tolist() for _ in range(n)]
        return ids, f"random token sequences (the training corpus is unavailable: {e})"
    ids = [t for t in tok.encode_batch(segment_documents(val, tok, limit, data.split_on_comma)) if t]
    n_val, source = len(ids), "validation split"
    for doc in train:
        if len(ids) >= n:
            break
        ids += [t for t in tok.encode_batch(segment_documents([doc], tok, limit, data.split_on_comma)) if t]
    picked = _pick(ids, n)
    if len(ids) > n_val:
        source = f"validation split ({n_val}) topped up from training documents"
    return picked, source


# ---------------------------------------------------------------- the export

def _versions() -> dict:
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__}


def _write_report(directory: Path, stem_json: str, stem_md: str, report: dict) -> None:
    (directory / stem_json).write_text(json.dumps(report, indent=2) + "\n")
    (directory / stem_md).write_text(render_markdown(report))


def export_checkpoint(checkpoint: Path, out: Path, *, quantize: str | None = None, force: bool = False,
                      n_verify: int = 100, weights: str = "ema", sentences_file: Path | None = None,
                      progress: Callable[[str], None] | None = None) -> ExportResult:
    """Export, verify, install. ExportError for user errors, VerificationFailed if ORT != torch."""
    step = progress or (lambda name: None)
    out = Path(out)
    if quantize is not None and quantize not in QUANT_MODES:
        raise ExportError(f"--quantize must be one of {', '.join(QUANT_MODES)}, got {quantize!r}")
    if n_verify < 1:
        raise ExportError(f"--n-verify must be >= 1, got {n_verify}")

    step("load")
    d, _ = checkpoint_kind(checkpoint)
    if weights not in ("ema", "model"):
        raise ExportError(f"--weights must be 'ema' or 'model', got {weights!r}")
    if not (d / f"{weights}.safetensors").is_file():
        raise ExportError(f"{d} has no {weights}.safetensors")
    notes = check_output_dir(out, model_id_for(d, weights), force)  # before the slow part
    loaded = load_checkpoint(d, weights)
    svae, cfg = loaded.svae, loaded.svae.cfg
    sentences, source = verification_sentences(loaded, n_verify, sentences_file)
    if len(sentences) < n_verify:
        notes.append(f"only {len(sentences)} sentences were available for the greedy check (asked {n_verify})")
    if loaded.opt is None:
        notes.append("stage-1 (SentenceVAE) checkpoint: edge bundle only, no cloud bundle")
    if not loaded.data.segmentation_version:
        notes.append(f"the checkpoint does not record its segmentation version; assumed {SEGMENTATION_VERSION}")

    out.mkdir(parents=True, exist_ok=True)
    tmp_edge = Path(tempfile.mkdtemp(dir=out, prefix=".edge."))
    tmp_cloud = Path(tempfile.mkdtemp(dir=out, prefix=".cloud.")) if loaded.opt is not None else None
    tmp_svae = tmp_edge.with_name(tmp_edge.name + ".svae")
    try:
        step("export encoder")  # written node by node with ORT's fused operators (modeling.fused_onnx)
        fused_onnx.save(fused_onnx.encoder_graph(svae.encoder), tmp_edge / ENCODER)
        step("export decoder")
        fused_onnx.save(fused_onnx.decoder_graph(svae.decoder), tmp_edge / DECODER)
        if quantize is None:  # one sentence per call; an int8 bundle decodes with the per-token loop
            fused_onnx.save(fused_onnx.sentence_graph(svae.decoder, cfg.bos_id, cfg.eos_id), tmp_edge / SENTENCE)

        step("verify")
        spec_fields = {"bos_id": cfg.bos_id, "eos_id": cfg.eos_id, "max_sentence_tokens": cfg.max_sentence_tokens,
                       "n_layers": svae.decoder.n_layers, "n_heads": svae.decoder.n_heads,
                       "head_dim": svae.decoder.head_dim}
        spec = decoder_spec(spec_fields)
        checker = {ENCODER: verify.check_graph(tmp_edge / ENCODER), DECODER: verify.check_graph(tmp_edge / DECODER)}
        enc, dec = cpu_session(tmp_edge / ENCODER), cpu_session(tmp_edge / DECODER)
        parity = (verify.encoder_parity(svae, enc, sentences) + verify.decoder_parity(svae, dec, sentences))
        greedy, ort_tokens = verify.greedy_agreement(svae, enc, dec, spec, sentences)
        speed_sessions = (cpu_session(tmp_edge / ENCODER, 1), cpu_session(tmp_edge / DECODER, 1))
        speed = verify.interleaved_speed([speed_sessions], spec, cfg.pad_id, sentences[:30])[0]
        if quantize is None:
            checker[SENTENCE] = verify.check_graph(tmp_edge / SENTENCE)
            sentence_check = verify.sentence_agreement(svae, enc, cpu_session(tmp_edge / SENTENCE), spec, sentences)
        else:
            sentence_check = None
        report = {
            "model_id": loaded.model_id, "checkpoint": str(loaded.path), "source_kind": loaded.kind,
            "weights": loaded.weights, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions(),
            "provider": CPU, "opset": OPSET, "tolerance": verify.TOLERANCE_RULE, "checker": checker,
            "parity": parity, "parity_max": _parity_max(parity), "sentence_source": source, "greedy": greedy,
            "speed": speed, "quantization": None, "notes": notes, "sentence_graph": sentence_check,
        }
        encoder_file, decoder_file = ENCODER, DECODER
        quantization = {"encoder": "fp32", "decoder": "fp32"}

        if quantize is not None:
            step("quantize")
            graphs = QUANTIZED_GRAPHS[quantize]
            names = {"encoder": (ENCODER, ENCODER_INT8), "decoder": (DECODER, DECODER_INT8)}
            q_sessions, sizes = {}, {}
            for g in ("encoder", "decoder"):
                src, dst = names[g]
                if g in graphs:
                    quantize_int8(tmp_edge / src, tmp_edge / dst, graphs[g])
                    checker[dst] = verify.check_graph(tmp_edge / dst)
                    sizes[g] = {"fp32": (tmp_edge / src).stat().st_size, "int8": (tmp_edge / dst).stat().st_size}
                    quantization[g] = quantize
                q_sessions[g] = cpu_session(tmp_edge / (dst if g in graphs else src), 1)
            effect = verify.quantization_effect(sentences, spec, cfg.pad_id, speed_sessions,
                                                (q_sessions["encoder"], q_sessions["decoder"]), ort_tokens)
            report["quantization"] = {"mode": quantize, "graphs": list(graphs),
                                      "op_types": {g: list(t) for g, t in graphs.items()}, "sizes": sizes, **effect}
            notes.append("int8: no sentence.onnx (the edge decodes with the per-token loop over the int8 decoder)")
            for g in graphs:  # the bundle ships the int8 graph instead of the fp32 one
                (tmp_edge / names[g][0]).unlink()
            encoder_file = ENCODER_INT8 if "encoder" in graphs else ENCODER
            decoder_file = DECODER_INT8 if "decoder" in graphs else DECODER

        failures = [f"{name}: {msg}" for name, msg in checker.items() if msg != "ok"]
        failures += [f"{c['graph']} {c['output']} ({c['inputs']}, {c['shape']}): max abs diff {c['max_abs_diff']}"
                     for c in parity if not c["ok"]]
        if not greedy["ok"]:
            bad = [x for x in greedy["differ"] if not x["near_tie"]]
            failures.append(f"greedy tokens differ from torch on {len(bad)} of {greedy['sentences']} sentences")
        if sentence_check is not None and not sentence_check["ok"]:
            bad = {k: len([x for x in sentence_check[k]["differ"] if not x["near_tie"]])
                   for k in ("controls_off", "controls_on")}
            failures.append(f"sentence.onnx differs from torch away from near ties: {bad} of "
                            f"{sentence_check['sentences']} sentences")
        report["passed"] = not failures
        report["failures"] = failures
        if failures:
            _write_report(out, FAILED_REPORT + ".json", FAILED_REPORT + ".md", report)
            raise VerificationFailed("verification failed, nothing was installed: " + "; ".join(failures[:3]) +
                                     f" (report: {out / (FAILED_REPORT + '.md')})", report)

        step("write")
        cloud_weights = None  # the edge bundle records the cloud half's weights hash: its identity
        if loaded.opt is not None:
            cloud_manifest = write_cloud_bundle(loaded.opt, tmp_cloud, loaded.model_id)
            cloud_weights = cloud_weights_sha256(cloud_manifest)
            cloud_opt, _ = load_cloud_bundle(tmp_cloud)
            ref = loaded.opt.state_dict()
            same = all(torch.equal(v, ref[k]) for k, v in cloud_opt.state_dict().items())
            report["cloud"] = {"tensors": len(ref), "reloaded_identical": bool(same)}
            if not same:
                raise VerificationFailed("the cloud bundle does not reload to the same weights", report)
        else:
            report["cloud"] = None
            if (out / "cloud").exists():
                notes.append(f"removed {out / 'cloud'}: it belonged to another model (a stage-1 export has no cloud half)")
        # the torch SentenceVAE beside the bundles (float32, exactly the exported weights): what evaluation
        # and further training load
        write_svae_folder(tmp_svae, svae, loaded.tokenizer,
                                     RunConfig(data=loaded.data, train=loaded.train),
                                     {"model_id": loaded.model_id, "how": f"exported from {loaded.path} "
                                      f"({loaded.weights} weights)"}, dtype="float32")
        svae_ref = svae.state_dict()
        if not all(torch.equal(v, svae_ref[k]) for k, v in load_svae_folder(tmp_svae, loaded.model_id).state_dict().items()):
            raise VerificationFailed("the svae/ folder does not reload to the same weights", report)
        report["svae"] = {"folder": SVAE_FOLDER, "bytes": sum(f.stat().st_size for f in tmp_svae.iterdir())}
        stop = report["stop_threshold"] = export_stop_threshold(loaded, notes)  # None: the head's argmax decides
        calibration = export_stop_calibration(loaded, notes)  # None: the rule decides on the raw P(stop)
        loaded.tokenizer.save(tmp_edge)
        _write_report(tmp_edge, REPORT_JSON, REPORT_MD, report)
        files = [encoder_file, decoder_file, TOKENIZER, TOKENIZER_META, REPORT_JSON, REPORT_MD]
        sentence_fields = {}
        if sentence_check is not None:
            files.append(SENTENCE)
            sentence_fields = {SENTENCE_FIELD: SENTENCE, "sentence_io": {"inputs": list(SENTENCE_INPUTS),
                                                                         "outputs": list(SENTENCE_OUTPUTS)}}
        write_edge_manifest(tmp_edge, {
            "model_id": loaded.model_id, "source_kind": loaded.kind, "weights": loaded.weights,
            "has_cloud_bundle": loaded.opt is not None, CLOUD_WEIGHTS_FIELD: cloud_weights,
            "d_model": cfg.d_model, "vocab_size": cfg.vocab_size, "pad_id": cfg.pad_id, **spec_fields,
            "kv_layout": KV_LAYOUT, "encoder_file": encoder_file, "decoder_file": decoder_file,
            "tokenizer_file": TOKENIZER, "quantization": quantization, "opset": OPSET,
            "encoder_io": {"inputs": list(ENCODER_INPUTS), "outputs": list(ENCODER_OUTPUTS)},
            "decoder_io": {"inputs": list(DECODER_INPUTS), "outputs": list(DECODER_OUTPUTS)}, **sentence_fields,
            "segmentation_version": loaded.data.segmentation_version or SEGMENTATION_VERSION,
            "split_on_comma": bool(loaded.data.split_on_comma),
            "verification": {"passed": True, "tolerance": verify.TOLERANCE_RULE, "parity_max": report["parity_max"],
                             "greedy_identical": f"{greedy['identical']}/{greedy['sentences']}"},
            STOP_THRESHOLD_FIELD: stop["threshold"] if stop else None,
            "stop_head": None if stop is None else {
                "threshold_rule": "max F1 of 'ends its paragraph' on the validation split",
                "precision": round(stop["precision"], 4), "recall": round(stop["recall"], 4)},
            STOP_CALIBRATION_FIELD: calibration,
        }, files)
        # last check: the bundle loads the way the edge loads it and decodes the same tokens
        bundle = load_edge_bundle(tmp_edge)
        probe = sentences[:4]
        expected = (ort_tokens[:4] if quantize is None else
                    verify.ort_reconstruct(q_sessions["encoder"], q_sessions["decoder"], spec, cfg.pad_id, probe))
        if bundle.decode_vectors(bundle.encode_ids(probe)) != expected:
            raise VerificationFailed("the written edge bundle decodes differently from the verified graphs", report)
        del bundle, enc, dec, speed_sessions

        replace_dir(tmp_edge, out / "edge")
        replace_dir(tmp_svae, out / SVAE_FOLDER)
        if tmp_cloud is not None:
            replace_dir(tmp_cloud, out / "cloud")
        elif (out / "cloud").exists():  # a stale cloud half of another model (only reachable with --force)
            shutil.rmtree(out / "cloud")
        for suffix in (".json", ".md"):
            (out / (FAILED_REPORT + suffix)).unlink(missing_ok=True)
        return ExportResult(out, out / "edge", out / "cloud" if tmp_cloud is not None else None, report, notes)
    finally:
        for tmp in (tmp_edge, tmp_cloud, tmp_svae):
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def export_stop_threshold(loaded: LoadedCheckpoint, notes: list[str]) -> dict | None:
    """The termination head's decision threshold on P(stop), chosen on the checkpoint's validation
    split (max F1 of "ends its paragraph", training.stop_head), for the edge manifest; None (the
    head's argmax decides) for a stage-1 export or when there is nothing to choose it on."""
    if loaded.opt is None:
        return None
    try:
        return validation_stop_threshold(SLLM(loaded.svae, loaded.opt), loaded.data, loaded.path)
    except (CorpusError, OSError, ValueError) as e:
        notes.append(f"no stop threshold in the edge bundle (the head's argmax decides): {e}")
        return None


def export_stop_calibration(loaded: LoadedCheckpoint, notes: list[str]) -> dict | None:
    """The stop rule's calibration (a Platt scale and a paragraph-length prior, fitted on the validation
    split, its threshold matched to the validation paragraphs' lengths: training.stop_head) for the edge
    manifest; None (the rule decides on the raw P(stop)) for a stage-1 export or without the data."""
    if loaded.opt is None:
        return None
    try:
        return validation_stop_calibration(SLLM(loaded.svae, loaded.opt), loaded.data, loaded.tokenizer, loaded.path)
    except (CorpusError, OSError, ValueError) as e:
        notes.append(f"no stop calibration in the edge bundle (the rule decides on the raw P(stop)): {e}")
        return None


def _parity_max(parity: list[dict]) -> dict:
    out: dict[str, float] = {}
    for c in parity:
        if c["max_abs_diff"] is None:
            continue
        key = f"{c['graph']}.{c['output']}"
        out[key] = max(out.get(key, 0.0), c["max_abs_diff"])
    return out


def regraph_export(folder: Path, n_verify: int = 100) -> dict:
    """Rewrite an export folder's edge graphs (encoder.onnx, decoder.onnx, sentence.onnx) from its svae/
    weights with this version's graph builder (modeling.fused_onnx), verified as an export verifies them;
    every other file of edge/ and every other manifest field stays. For bundles exported before the
    fused graphs (models/default). Returns the verification report; ExportError / VerificationFailed."""
    from sllm.training.load import load_sentence_vae

    folder = Path(folder)
    edge = folder / "edge"
    try:
        manifest = read_manifest(edge, kind="edge")
        svae = load_svae_folder(folder / SVAE_FOLDER, manifest["model_id"])
        trained = load_sentence_vae(folder)
    except (BundleError, CheckpointError) as e:
        raise ExportError(f"cannot regraph {folder}: {e}") from None
    if manifest.get("quantization") != {"encoder": "fp32", "decoder": "fp32"}:
        raise ExportError(f"{edge} holds int8 graphs: export the checkpoint again with --quantize int8")
    cfg = svae.cfg
    loaded = LoadedCheckpoint(manifest["source_kind"], folder / SVAE_FOLDER, "svae", manifest["model_id"], svae,
                              None, trained.tokenizer, trained.run.data, trained.run.train)
    sentences, source = verification_sentences(loaded, n_verify)
    spec = decoder_spec(manifest)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".edge."))
    try:
        for name in manifest["files"]:
            if name not in (ENCODER, DECODER, SENTENCE):
                shutil.copy2(edge / name, tmp / name)
        fused_onnx.save(fused_onnx.encoder_graph(svae.encoder), tmp / ENCODER)
        fused_onnx.save(fused_onnx.decoder_graph(svae.decoder), tmp / DECODER)
        fused_onnx.save(fused_onnx.sentence_graph(svae.decoder, cfg.bos_id, cfg.eos_id), tmp / SENTENCE)
        checker = {g: verify.check_graph(tmp / g) for g in (ENCODER, DECODER, SENTENCE)}
        enc, dec = cpu_session(tmp / ENCODER), cpu_session(tmp / DECODER)
        parity = verify.encoder_parity(svae, enc, sentences) + verify.decoder_parity(svae, dec, sentences)
        greedy, _ = verify.greedy_agreement(svae, enc, dec, spec, sentences)
        sentence_check = verify.sentence_agreement(svae, enc, cpu_session(tmp / SENTENCE), spec, sentences)
        regraph = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions(), "checker": checker,
                   "parity_max": _parity_max(parity), "sentence_source": source, "greedy": greedy,
                   "sentence_graph": sentence_check, "from": f"{SVAE_FOLDER}/ ({manifest['model_id']})"}
        failures = [f"{n}: {m}" for n, m in checker.items() if m != "ok"]
        failures += [f"{c['graph']} {c['output']}: max abs diff {c['max_abs_diff']}" for c in parity if not c["ok"]]
        if not greedy["ok"] or not sentence_check["ok"]:
            failures.append("greedy tokens differ from torch away from near ties")
        if failures:
            raise VerificationFailed("regraph verification failed, nothing was replaced: " + "; ".join(failures[:3]),
                                     regraph)
        report = json.loads((edge / REPORT_JSON).read_text()) if (edge / REPORT_JSON).is_file() else {}
        report["regraph"] = regraph
        _write_report(tmp, REPORT_JSON, REPORT_MD, report)
        fields = {k: v for k, v in manifest.items() if k not in ("files", "format_version", "kind")}
        fields.update({"opset": OPSET, SENTENCE_FIELD: SENTENCE,
                       "sentence_io": {"inputs": list(SENTENCE_INPUTS), "outputs": list(SENTENCE_OUTPUTS)}})
        files = sorted(set(manifest["files"]) | {ENCODER, DECODER, SENTENCE, REPORT_JSON, REPORT_MD})
        write_edge_manifest(tmp, fields, files)
        load_edge_bundle(tmp)  # loads as the edge loads it
        replace_dir(tmp, edge)
        return regraph
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

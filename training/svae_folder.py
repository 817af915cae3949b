"""`OUT/svae`: the torch SentenceVAE of an export, so the model can be evaluated and trained further.

    svae/
      ema.safetensors       the SentenceVAE's weights (float16 to keep the repository small)
      config.json           a SentenceVAE run config (kind sentence_vae): model, data, train
      tokenizer.json, tokenizer_meta.json
      source.json           the export it belongs to (model id) and how it was checked against the graphs
      manifest.json         sha256 of every file (a checkpoint manifest, written last)

It is a stage-1 checkpoint in form (no optimizer state), so everything that takes one takes it:
`sllm-train eval|reconstruct`, `sllm.svae_checkpoint=` of a stage-2 run. `sllm.training.load` reads an
export folder with it as a whole model (`load_sllm(models/default)`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from sllm.modeling.generate import decode_sentences
from sllm.modeling.sentence_vae import SentenceVAE, pad_token_lists
from sllm.modeling.weights import save_tensors
from sllm.runtime.svae_onnx import decoder_step, greedy_decode
from sllm.training.checkpoint import write_checkpoint_dir
from sllm.training.config import DataConfig, RunConfig, save_json
from sllm.training.data.corpus import load_documents, split_documents
from sllm.training.data.sentence_data import segment_documents

FOLDER = "svae"
SOURCE = "source.json"
WEIGHTS = "ema.safetensors"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
TOLERANCE = 1e-4  # relative, as the exporter's own ORT-vs-torch rule


def write_svae_folder(out_dir: Path, svae: SentenceVAE, tokenizer, run: RunConfig, source: dict,
                      dtype: str = "float16") -> Path:
    """Write the folder atomically (a checkpoint directory: files, then the manifest, then renamed in)."""
    run.model = svae.cfg
    run.data = portable_data(run.data, svae.cfg.vocab_size)
    run.validate()
    state = {k: v.to(DTYPES[dtype]) for k, v in svae.state_dict().items()}
    if svae.cfg.tie_embeddings:  # the output layer is the token embedding: stored once (training.load refills it)
        del state["decoder.lm_head.weight"]

    def write(tmp: Path) -> None:
        save_tensors(state, tmp / WEIGHTS, metadata={"dtype": dtype})
        save_json(run, tmp / "config.json")
        tokenizer.save(tmp)
        (tmp / SOURCE).write_text(json.dumps({**source, "dtype": dtype}, indent=2, sort_keys=True) + "\n")

    write_checkpoint_dir(Path(out_dir), write)
    return Path(out_dir)


def portable_data(data: DataConfig, vocab_size: int) -> DataConfig:
    """The data config as it reads on another machine: the folder carries its own tokenizer, and a
    prepared dataset (a path on the training machine) is replaced by what it was prepared from (its
    corpus, split and segmentation), which `sllm-train` prepares again on first use."""
    out = dataclasses.replace(data, tokenizer="", vocab_size=vocab_size)
    if data.dataset:
        from sllm.training.data.dataset import PreparedDataset

        prepared = PreparedDataset.open(Path(data.dataset))
        settings = prepared.settings
        out = dataclasses.replace(out, dataset="", corpus=list(prepared.manifest["corpus"]),
                                  val_fraction=settings["val_fraction"], split_seed=settings["split_seed"],
                                  split_on_comma=settings["split_on_comma"])
    return out


def read_source(svae_dir: Path) -> dict:
    path = Path(svae_dir) / SOURCE
    return json.loads(path.read_text()) if path.is_file() else {}


def rounded(svae: SentenceVAE, dtype: str) -> SentenceVAE:
    """A copy of `svae` whose weights went through `dtype` and back to float32 (what loading the folder gives)."""
    copy = SentenceVAE(svae.cfg)
    copy.load_state_dict({k: v.to(DTYPES[dtype]).float() for k, v in svae.state_dict().items()})
    return copy.eval()


@torch.no_grad()
def compare_with_graphs(svae: SentenceVAE, bundle, sentences: list[list[int]], batch: int = 64) -> dict:
    """The torch SentenceVAE against an edge bundle's graphs (ONNX Runtime) on `sentences`:
    encoder vectors, teacher-forced decoder logits (max abs difference, and relative to max |torch|),
    and greedy reconstructions token for token."""
    svae = svae.eval()
    cfg = svae.cfg
    enc_diff = enc_max = dec_diff = dec_max = 0.0
    identical = 0
    for start in range(0, len(sentences), batch):
        chunk = sentences[start : start + batch]
        ids, mask = pad_token_lists(chunk, cfg.pad_id)
        ours = svae.encode(ids, mask)  # [B, d]
        theirs = bundle.encode_ids(chunk)
        enc_diff = max(enc_diff, float(np.abs(ours.numpy() - theirs).max()))
        enc_max = max(enc_max, float(ours.abs().max()))
        dec_in, _ = svae.teacher_forcing_targets(ids, mask)  # [B, L+1]
        logits, _ = svae.decoder(dec_in, ours)
        ort_logits, _ = decoder_step(bundle.decoder, dec_in.numpy(), ours.numpy(), bundle.spec.empty_kv(len(chunk)))
        real = torch.cat((torch.ones(len(chunk), 1, dtype=torch.bool), mask), dim=1)  # bos + tokens
        dec_diff = max(dec_diff, float(np.abs(logits.numpy() - ort_logits)[real.numpy()].max()))
        dec_max = max(dec_max, float(logits[real].abs().max()))
        torch_tokens = decode_sentences(svae.decoder, ours, cfg.max_sentence_tokens)
        ort_tokens = greedy_decode(bundle.decoder, theirs, bundle.spec)
        identical += sum(a == b for a, b in zip(torch_tokens, ort_tokens))
    return {"sentences": len(sentences), "encoder_max_abs_diff": enc_diff, "encoder_max_abs": enc_max,
            "decoder_logits_max_abs_diff": dec_diff, "decoder_logits_max_abs": dec_max,
            "greedy_identical": identical,
            "within_tolerance": enc_diff <= TOLERANCE * max(1.0, enc_max) and dec_diff <= TOLERANCE * max(1.0, dec_max)}


def validation_token_lists(data: DataConfig, tokenizer, max_tokens: int, n: int) -> list[list[int]]:
    """`n` evenly spaced sentences of the validation split, as the model's segmentation cuts them."""
    _, val = split_documents(load_documents(data.corpus or None), data.val_fraction, data.split_seed)
    ids = [t for t in tokenizer.encode_batch(segment_documents(val, tokenizer, max_tokens, data.split_on_comma)) if t]
    index = np.unique(np.linspace(0, len(ids) - 1, num=min(n, len(ids))).astype(np.int64))
    return [ids[i] for i in index]


def recover_svae_folder(model_dir: Path, run: RunConfig, dtype: str = "float16", n_verify: int = 500,
                        log=print) -> dict:
    """MODEL/svae from MODEL/edge's ONNX graphs: recovered in fp32, checked against the graphs
    (within the exporter's tolerance, every greedy reconstruction identical, else RecoveryError),
    stored in `dtype` (also measured against the graphs). `run` gives the data and training config
    (the model config comes from the graphs). -> the report written into source.json."""
    from sllm.runtime.edge_bundle import ENCODER, load_edge_bundle
    from sllm.training.svae_from_onnx import RecoveryError, recover_sentence_vae

    model_dir = Path(model_dir)
    edge_dir = model_dir / "edge"
    svae, cfg = recover_sentence_vae(edge_dir)
    bundle = load_edge_bundle(edge_dir)
    m = bundle.manifest
    run.model = cfg
    run.data.split_on_comma = bool(m["split_on_comma"])
    run.data.segmentation_version = m["segmentation_version"]
    sentences = validation_token_lists(run.data, bundle.tokenizer, cfg.max_sentence_tokens, n_verify)
    log(f"recovered {svae.num_parameters():,} parameters; checking them against the graphs on {len(sentences)} "
        "validation sentences")
    exact = compare_with_graphs(svae, bundle, sentences)
    if not exact["within_tolerance"] or exact["greedy_identical"] != exact["sentences"]:
        raise RecoveryError(f"the recovered SentenceVAE does not reproduce {edge_dir}'s graphs: {exact}")
    stored = compare_with_graphs(rounded(svae, dtype), bundle, sentences) if dtype != "float32" else exact
    decoder = m["decoder_file"]
    source = {"model_id": m["model_id"], "recovered_from": {name: m["files"][name] for name in (ENCODER, decoder)},
              "how": "ONNX initializers of the edge graphs mapped onto SentenceVAE's state dict "
                     "(training.svae_from_onnx)",
              "check_float32": exact, f"check_{dtype}": stored}
    write_svae_folder(model_dir / FOLDER, svae, bundle.tokenizer, run, source, dtype)
    log(f"wrote {model_dir / FOLDER}: float32 recovery max |torch - ORT| {exact['decoder_logits_max_abs_diff']:.2g} on "
        f"logits, {exact['greedy_identical']}/{exact['sentences']} greedy identical; stored in {dtype}: "
        f"{stored['greedy_identical']}/{stored['sentences']} greedy identical")
    return source

"""The edge bundle: what the edge client needs to turn text into vectors and vectors into text.

    edge/
      encoder.onnx          ids [B, L], mask [B, L] -> vectors [B, d]
      decoder.onnx          cached step: ids [B, T], memory [B, d], past_kv -> logits, present_kv
                            (decoder.int8.onnx instead when exported with --quantize int8)
      sentence.onnx         optional (manifest sentence_file): one whole sentence per run(), the decoder
                            step in an ONNX Loop with the sampling and repetition controls inside;
                            bundles without it decode with the per-token loop over decoder.onnx
      tokenizer.json        tokenizers' own format
      tokenizer_meta.json   pad/bos/eos ids (read by sentences.tokenizer.SentenceTokenizer.load)
      report.json/.md       the torch-vs-ORT verification the exporter ran
      manifest.json         kind "edge", model id, sizes, special ids, file names, sha256 of each file,
                            cloud_weights_sha256: the sha256 of the cloud half's cloud.safetensors,
                            stop_threshold (optional): the edge ends an answer when the cloud's
                            P(stop) >= it (chosen on validation; absent: the cloud's argmax flag)
                            stop_calibration (optional): {scale, offsets, threshold, ...}: the stop rule
                            decides on P(stop) calibrated at the answer's position and this threshold
                            (sllm.sentences.sampling.StopCalibration; fitted on validation at export;
                            absent: on the raw P(stop) and stop_threshold)

The edge chats only with a cloud model whose weights have that sha256 (`EdgeBundle.cloud_mismatch`):
the model id is a label anyone can write, the hash is what was exported.

No torch here: the edge imports this module (numpy, onnxruntime, tokenizers only).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sllm.runtime.manifest import CLOUD_WEIGHTS, BundleError, listed_file, read_manifest, write_manifest
from sllm.runtime.providers import cpu_session
from sllm.runtime.svae_onnx import SENTENCE_INPUTS, SENTENCE_OUTPUTS, DecoderSpec, encode, greedy_decode
from sllm.sentences.sampling import StopCalibration

KIND = "edge"
ENCODER = "encoder.onnx"
DECODER = "decoder.onnx"
ENCODER_INT8 = "encoder.int8.onnx"
DECODER_INT8 = "decoder.int8.onnx"
SENTENCE = "sentence.onnx"
SENTENCE_FIELD = "sentence_file"  # optional: absent in bundles exported before it, and in int8 exports
TOKENIZER = "tokenizer.json"
TOKENIZER_META = "tokenizer_meta.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
KV_LAYOUT = "[n_layers, 2, batch, n_heads, past, head_dim]"

# manifest fields the edge reads; write_edge_manifest refuses to write a bundle without them
REQUIRED_FIELDS = ("model_id", "d_model", "vocab_size", "pad_id", "bos_id", "eos_id", "max_sentence_tokens",
                   "n_layers", "n_heads", "head_dim", "encoder_file", "decoder_file", "tokenizer_file",
                   "segmentation_version", "split_on_comma")
# the sha256 of the cloud half's weights (None: a stage-1 export, no cloud half); absent in bundles
# exported before it existed, which the edge loads but refuses to chat with (`cloud_mismatch`)
CLOUD_WEIGHTS_FIELD = "cloud_weights_sha256"
# the decision threshold on P(stop) (a number in [0, 1]); optional: bundles exported before it stop
# on the termination head's argmax, which a head trained on rare paragraph ends almost never says
STOP_THRESHOLD_FIELD = "stop_threshold"
# optional too: {"scale", "offsets", "threshold", and how they were fitted}; bundles exported before it
# decide on the raw P(stop) and stop_threshold
STOP_CALIBRATION_FIELD = "stop_calibration"


def check_stop_threshold(bundle_dir: Path, manifest: dict) -> float | None:
    value = manifest.get(STOP_THRESHOLD_FIELD)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise BundleError(f"{bundle_dir}: {STOP_THRESHOLD_FIELD} {value!r} is not a number in [0, 1]; re-export "
                          "the bundle")
    return float(value)


def check_stop_calibration(bundle_dir: Path, manifest: dict) -> StopCalibration | None:
    value = manifest.get(STOP_CALIBRATION_FIELD)
    if value is None:
        return None
    try:
        if not isinstance(value, dict) or not isinstance(value.get("offsets"), list):
            raise ValueError("it is not an object with a list of offsets")
        return StopCalibration(scale=value.get("scale"), offsets=tuple(value["offsets"]),
                               threshold=value.get("threshold"))
    except ValueError as e:
        raise BundleError(f"{bundle_dir}: {STOP_CALIBRATION_FIELD} is not a stop calibration ({e}); re-export the "
                          "bundle") from None


def write_edge_manifest(bundle_dir: Path, fields: dict, files: list[str]) -> dict:
    missing = [k for k in (*REQUIRED_FIELDS, CLOUD_WEIGHTS_FIELD) if k not in fields]
    if missing:
        raise ValueError(f"edge manifest fields missing: {missing}")
    check_stop_threshold(bundle_dir, fields)
    check_stop_calibration(bundle_dir, fields)
    return write_manifest(bundle_dir, {"kind": KIND, **fields}, files)


def decoder_spec(manifest: dict) -> DecoderSpec:
    return DecoderSpec(bos_id=int(manifest["bos_id"]), eos_id=int(manifest["eos_id"]),
                       max_sentence_tokens=int(manifest["max_sentence_tokens"]),
                       n_layers=int(manifest["n_layers"]), n_heads=int(manifest["n_heads"]),
                       head_dim=int(manifest["head_dim"]))


@dataclass
class EdgeBundle:
    """A verified edge bundle, loaded: ORT sessions (CPU) and the tokenizer."""

    path: Path
    manifest: dict
    tokenizer: object  # sentences.tokenizer.SentenceTokenizer
    encoder: object  # onnxruntime.InferenceSession
    decoder: object
    spec: DecoderSpec
    sentence: object | None = None  # sentence.onnx's session, when the bundle has one

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def stop_threshold(self) -> float | None:
        """End an answer when P(stop) >= this (None: the termination head's argmax flag)."""
        return check_stop_threshold(self.path, self.manifest)

    @property
    def stop_calibration(self) -> StopCalibration | None:
        """How P(stop) is calibrated before the threshold (None: it is not; a bundle exported before)."""
        return check_stop_calibration(self.path, self.manifest)

    def encode_ids(self, token_lists: list[list[int]]) -> np.ndarray:
        """Token lists (each 1..max_sentence_tokens ids) -> sentence vectors float32 [B, d]."""
        limit, vocab = self.spec.max_sentence_tokens, int(self.manifest["vocab_size"])
        if any(len(t) > limit for t in token_lists):
            raise ValueError(f"a sentence exceeds max_sentence_tokens={limit}; split it first")
        if any(not 0 <= i < vocab for t in token_lists for i in t):
            raise ValueError(f"a token id is outside the vocabulary [0, {vocab})")
        return encode(self.encoder, token_lists, int(self.manifest["pad_id"]))

    def cloud_mismatch(self, model_id: str, d: int, weights_sha256: str, cloud: str,
                       refusing: str = "refusing it") -> str | None:
        """Why the cloud model `cloud` describes ("the server at HOST:PORT serves", "DIR holds") is not
        the other half of this bundle, as a message to show (with `refusing`: "refusing to chat"); None
        when it is: the same model id and d, and weights whose sha256 is the one recorded at export."""
        ours, where = self.manifest, f"the edge bundle {self.path}"
        if (model_id, d) != (self.model_id, self.d_model):
            return (f"the edge bundle and the cloud model are not halves of the same model: {where} holds "
                    f"{self.model_id} (d={self.d_model}), {cloud} {model_id} (d={d}); {refusing}. Use the edge/ "
                    "and cloud/ of one export.")
        if CLOUD_WEIGHTS_FIELD not in ours:
            return (f"{where} was exported before edge bundles recorded the sha256 of their cloud weights, so "
                    f"the cloud model cannot be checked (its id {model_id} is only a label); {refusing}: re-export "
                    "the bundle with this version (`sllm-export CHECKPOINT --out DIR`, both halves)")
        expected = ours[CLOUD_WEIGHTS_FIELD]
        if not expected:
            return f"{where} is a stage-1 export with no cloud half: it cannot chat with a cloud model"
        if not weights_sha256:
            return (f"{cloud} {model_id} without the sha256 of its weights (a cloud server older than this "
                    f"edge), so it cannot be checked; {refusing}: update the server")
        if weights_sha256 != expected:
            return (f"the cloud model is not the other half of this edge bundle: {cloud} {model_id} with weights "
                    f"sha256 {weights_sha256}, but {where} was exported with cloud weights sha256 {expected} "
                    f"(a relabelled, retrained or modified {CLOUD_WEIGHTS}); {refusing}. Use the edge/ and "
                    "cloud/ of one export.")
        return None

    def decode_vectors(self, vectors: np.ndarray, max_tokens: int | None = None) -> list[list[int]]:
        """Sentence vectors [B, d] -> greedy token lists (without bos/eos)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.d_model:
            raise ValueError(f"vectors must be [batch, {self.d_model}], got shape {vectors.shape}")
        return greedy_decode(self.decoder, vectors, self.spec, max_tokens)


def load_edge_bundle(bundle_dir: Path, threads: int = 0) -> EdgeBundle:
    """Check every file against the manifest, then load the tokenizer and the two graphs (CPU)."""
    from sllm.sentences.tokenizer import SentenceTokenizer, TokenizerError

    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir, kind=KIND, required=(TOKENIZER_META,))
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise BundleError(f"{bundle_dir}: the manifest lacks {missing}; re-export the bundle")
    check_stop_threshold(bundle_dir, manifest)
    check_stop_calibration(bundle_dir, manifest)
    encoder_file, decoder_file, tokenizer_file = (listed_file(bundle_dir, manifest, key)
                                                  for key in ("encoder_file", "decoder_file", "tokenizer_file"))
    if tokenizer_file.parent != bundle_dir:  # its special ids are read from the tokenizer_meta.json beside it
        raise BundleError(f"{bundle_dir}: tokenizer_file {manifest['tokenizer_file']!r} is not at the bundle's top")
    try:
        tok = SentenceTokenizer.load(tokenizer_file)
    except TokenizerError as e:
        raise BundleError(f"{bundle_dir}: {e}") from None
    expected = (manifest["vocab_size"], manifest["pad_id"], manifest["bos_id"], manifest["eos_id"])
    if (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) != tuple(expected):
        raise BundleError(f"{bundle_dir}: the tokenizer (vocab {tok.vocab_size}, pad/bos/eos "
                          f"{tok.pad_id}/{tok.bos_id}/{tok.eos_id}) does not match the manifest {expected}")
    encoder = cpu_session(str(encoder_file), threads)
    decoder = cpu_session(str(decoder_file), threads)
    _check_graph_io(bundle_dir, manifest, encoder, decoder)
    sentence = None
    if manifest.get(SENTENCE_FIELD):
        sentence = cpu_session(str(listed_file(bundle_dir, manifest, SENTENCE_FIELD)), threads)
        names = ([i.name for i in sentence.get_inputs()], [o.name for o in sentence.get_outputs()])
        if (set(names[0]), names[1]) != (set(SENTENCE_INPUTS), list(SENTENCE_OUTPUTS)):
            raise BundleError(f"{bundle_dir}: {manifest[SENTENCE_FIELD]} has inputs {sorted(names[0])} and outputs "
                              f"{names[1]}, not the sentence graph's; re-export the bundle")
    return EdgeBundle(bundle_dir, manifest, tok, encoder, decoder, decoder_spec(manifest), sentence)


def _check_graph_io(bundle_dir: Path, m: dict, encoder, decoder) -> None:
    """The graphs' names and fixed sizes must be the ones the manifest describes."""
    def shapes(values):
        return {v.name: list(v.shape) for v in values}

    enc_in, enc_out = shapes(encoder.get_inputs()), shapes(encoder.get_outputs())
    dec_in, dec_out = shapes(decoder.get_inputs()), shapes(decoder.get_outputs())
    kv = dec_in.get("past_kv", [None] * 6)
    problems = []
    if set(enc_in) != {"ids", "mask"} or enc_out.get("vectors", [None, None])[-1] != m["d_model"]:
        problems.append(f"encoder inputs {sorted(enc_in)} / outputs {enc_out}")
    if set(dec_in) != {"ids", "memory", "past_kv"} or set(dec_out) != {"logits", "present_kv"}:
        problems.append(f"decoder inputs {sorted(dec_in)} / outputs {sorted(dec_out)}")
    elif (len(kv) != 6 or [kv[0], kv[1], kv[3], kv[5]] != [m["n_layers"], 2, m["n_heads"], m["head_dim"]]
          or dec_in["memory"][-1] != m["d_model"] or dec_out["logits"][-1] != m["vocab_size"]):
        problems.append(f"decoder past_kv {kv}, memory {dec_in['memory']}, logits {dec_out['logits']}")
    if problems:
        raise BundleError(f"{bundle_dir}: the graphs do not match the manifest ({'; '.join(problems)}); "
                          "re-export the bundle")

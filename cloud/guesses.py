"""What the cloud's speculation guesses with: the edge bundle's own ONNX graphs, run as the edge runs them.

A guess is h_t decoded into a sentence (greedy, with the answer's repetition controls over its earlier
sentences) and that sentence re-encoded into its vector. The cloud decodes with the edge's graphs and the
edge's torch-free decode functions (`sllm.runtime.svae_onnx`, `sllm.runtime.sampling`), so a guess is the
sentence the edge decodes from the same h_t with the same options, token for token, and the edge accepts
it. The pending guesses of all sessions decode as one batch: one decoder.onnx call per token for all rows
(`decode_loop`, each row with its own controls and token limit: `Picker.rows`), then one encoder.onnx call;
a single guess runs sentence.onnx (one call), as the edge does.

The graphs come from an edge bundle of the same model (hashes checked, `load_edge_bundle`): the edge/
beside the cloud bundle, or `sllm-cloud serve --edge-bundle DIR`. No torch here; CPU sessions (the graphs
are small, and the edge's CPU build is what the guesses must equal).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sllm.runtime.edge_bundle import EdgeBundle, load_edge_bundle
from sllm.runtime.manifest import BundleError
from sllm.runtime.sampling import Picker
from sllm.runtime.svae_onnx import decode_loop, decode_vectors, encode
from sllm.sentences.sampling import AnswerOptions, SamplingConfig

FOLDER = "edge"  # beside cloud/ in an export folder


def edge_folder_of(cloud_bundle_dir: Path) -> Path | None:
    """The edge/ of the export folder a cloud bundle sits in, when there is one."""
    folder = Path(cloud_bundle_dir).resolve().parent / FOLDER
    return folder if (folder / "manifest.json").is_file() else None


class GuessCodec:
    """h_t [B, d] -> the sentences the edge would decode -> their vectors, with the edge bundle's graphs."""

    def __init__(self, bundle: EdgeBundle):
        self.bundle = bundle
        self.spec = bundle.spec
        self.pad_id = int(bundle.manifest["pad_id"])
        self.d = bundle.d_model

    @classmethod
    def load(cls, edge_dir: Path, model_id: str, d: int, weights_sha256: str, threads: int = 0) -> "GuessCodec":
        """The edge bundle in `edge_dir`; BundleError when it is missing, corrupt, or not the other half of the
        cloud model (`model_id`, `d`, the sha256 of its weights; the edge's own pairing rule): its guesses would
        be another model's sentences, every one rolled back."""
        bundle = load_edge_bundle(Path(edge_dir), threads)
        problem = bundle.cloud_mismatch(model_id, d, weights_sha256, "the cloud bundle this server loads holds",
                                        "refusing to speculate with it")
        if problem is not None:
            raise BundleError(f"{problem} (speculation guesses with {edge_dir}: --edge-bundle DIR)")
        return cls(bundle)

    def decode(self, hidden: np.ndarray, controls: Sequence[AnswerOptions | None] | None = None,
               histories: Sequence[Sequence[Sequence[int]]] | None = None,
               between: Callable[[], None] | None = None) -> list[list[int]]:
        """h_t [B, d] -> one greedy token list per row (empty: eos straight away). controls[i]: how the edge
        decodes row i's answer (its repetition controls and token limit; None: plain greedy at the bundle's
        limit), applied over histories[i] (the answer's earlier sentences) exactly as the edge applies them.
        between(): called between the tokens of a batch (`decode_loop`; one row is a single call)."""
        memory = np.asarray(hidden, dtype=np.float32)
        if memory.ndim != 2 or memory.shape[1] != self.d:
            raise ValueError(f"h_t must be [batch, {self.d}], got shape {memory.shape}")
        B, top = len(memory), self.spec.max_sentence_tokens
        controls = controls or [None] * B
        options = [SamplingConfig() if c is None else c for c in controls]  # None: plain greedy
        answers = histories or [()] * B  # read only where a row's controls are on (guards_for, Picker.rows)
        limits = [top if c is None else min(c.max_tokens or top, top) for c in controls]
        if B == 1:  # the edge's own call for one sentence (sentence.onnx where the bundle has it)
            return decode_vectors(self.bundle.decoder, memory, self.spec, options[0], limits[0], answers[0],
                                  self.bundle.sentence)
        return decode_loop(self.bundle.decoder, memory, self.spec, Picker.rows(options, answers, self.spec.eos_id,
                                                                                limits), max(limits, default=0),
                           between)

    def encode(self, token_lists: list[list[int]]) -> np.ndarray:
        """Non-empty token lists -> sentence vectors [B, d] float32 (encoder.onnx, as the edge encodes)."""
        return encode(self.bundle.encoder, token_lists, self.pad_id)

"""The edge half of the SLLM: text <-> sentence vectors with ONNX Runtime. No torch here.

    rt = EdgeRuntime.load("models/default/edge")      # hashes checked, graphs checked
    ids = rt.prompt_sentences("Any text. Of any length,")  # segment + tokenize (as in training)
    vectors = rt.encode(ids)                           # encoder.onnx: [S, d] float32
    tokens = rt.decode(h_t, Sampling())                # decoder.onnx with its KV cache
    text = rt.detokenize(tokens)

The loops mirror the torch reference (`sllm.modeling.sllm_generate.SLLMGenerator` and
`sllm.modeling.generate.decode_sentences`): the prompt is split with the shared segmenter
(`sllm.sentences.limit.text_to_sentences`, the bundle's split_on_comma and max sentence length,
blank pieces skipped), a sentence decodes from bos until eos or the token limit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from sllm.runtime.edge_bundle import EdgeBundle, load_edge_bundle
from sllm.runtime.manifest import BundleError
from sllm.runtime.providers import open_sessions
from sllm.runtime.providers import CPU
from sllm.runtime.sampling import Sampling
from sllm.runtime.svae_onnx import decode_vectors
from sllm.runtime.svae_onnx import encode as ort_encode
from sllm.sentences.limit import sentence_token_ids
from sllm.sentences.segment import SEGMENTATION_VERSION
from sllm.sentences.tokenizer import TokenizerError


class PromptError(ValueError):
    """A prompt the model cannot take (empty, or text the tokenizer cannot encode)."""


@dataclass
class Decoded:
    ids: list[int]
    text: str
    ms: float


class EdgeRuntime:
    def __init__(self, bundle: EdgeBundle, encoder, decoder, provider: str, device_note: str = "",
                 notes: list[str] | None = None):
        self.bundle = bundle
        self.encoder, self.decoder = encoder, decoder
        self.provider = provider  # "CPUExecutionProvider" or "CUDAExecutionProvider"
        self.device_note = device_note  # why not CUDA (--device auto on a machine where it does not load)
        self.notes = notes or []  # worth a warning: a segmentation version other than the bundle's
        m = bundle.manifest
        self.tokenizer = bundle.tokenizer
        self.spec = bundle.spec
        self.split_on_comma = bool(m["split_on_comma"])
        self.pad_id = int(m["pad_id"])
        # one run() per sentence (sentence.onnx) where the bundle has it; on CUDA the per-token loop
        self.sentence = bundle.sentence if provider == CPU else None

    @classmethod
    def load(cls, bundle_dir: str | Path, device: str = "auto", threads: int = 0) -> "EdgeRuntime":
        """Load and verify an edge bundle (BundleError when it is missing, corrupt or inconsistent)."""
        bundle_dir = Path(bundle_dir)
        try:
            bundle = load_edge_bundle(bundle_dir, threads)
        except BundleError:
            raise
        except Exception as e:  # noqa: BLE001 - ORT refusing a graph whose hash matched (edited manifest)
            raise BundleError(f"{bundle_dir}: cannot load the bundle ({type(e).__name__}: {e})") from None
        m = bundle.manifest
        paths = [str(bundle_dir / m["encoder_file"]), str(bundle_dir / m["decoder_file"])]
        (encoder, decoder), provider, note = open_sessions(paths, device, threads,
                                                           cpu_sessions=[bundle.encoder, bundle.decoder])
        notes = []
        if m["segmentation_version"] != SEGMENTATION_VERSION:
            notes.append(f"the bundle was trained with segmentation {m['segmentation_version']!r}, this edge "
                         f"segments with {SEGMENTATION_VERSION!r}: prompts may be split differently")
        return cls(bundle, encoder, decoder, provider, note, notes)

    # ------------------------------------------------------------ facts

    @property
    def model_id(self) -> str:
        return self.bundle.model_id

    @property
    def d_model(self) -> int:
        return self.bundle.d_model

    @property
    def max_sentence_tokens(self) -> int:
        return self.spec.max_sentence_tokens

    @property
    def path(self) -> Path:
        return self.bundle.path

    # ------------------------------------------------------------ text -> vectors

    def prompt_sentences(self, text: str) -> list[list[int]]:
        """Token ids of each sentence of `text` (as the torch reference splits it)."""
        try:
            ids = sentence_token_ids(text, self.tokenizer, self.max_sentence_tokens, self.split_on_comma)
        except TokenizerError as e:
            raise PromptError(str(e)) from None
        if not ids:
            raise PromptError("the prompt is empty or only whitespace")
        return ids

    def encode(self, token_lists: list[list[int]]) -> np.ndarray:
        """Sentence vectors float32 [S, d] (encoder.onnx)."""
        return ort_encode(self.encoder, token_lists, self.pad_id)

    # ------------------------------------------------------------ vectors -> text

    def decode(self, hidden: np.ndarray, sampling: Sampling, max_tokens: int | None = None,
               answer: Sequence[Sequence[int]] = ()) -> Decoded:
        """One sentence from one vector h_t [d]: tokens until eos or min(max_tokens, the bundle's limit).
        answer: the earlier sentences of the same answer (for the sampling's repetition controls)."""
        t0 = time.perf_counter()
        memory = np.asarray(hidden, dtype=np.float32).reshape(1, -1)
        if memory.shape[1] != self.d_model:
            raise ValueError(f"h_t has {memory.shape[1]} values, this bundle's vectors have d={self.d_model}")
        ids = decode_vectors(self.decoder, memory, self.spec, sampling, max_tokens, answer, self.sentence)[0]
        return Decoded(ids, self.tokenizer.decode(ids), (time.perf_counter() - t0) * 1e3)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


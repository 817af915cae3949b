"""Run the exported SentenceVAE graphs with onnxruntime: encode token lists, greedy-decode vectors.

numpy only (the sessions come from runtime.providers; no torch, no tokenizers): the edge runs this, and the
exporter checks it against the torch loop in `sllm.modeling.generate.decode_sentences`
token for token.

Graph contract (the names the exporter gives, see `sllm.export.onnx_export`):
    encoder.onnx  ids int64 [B, L], mask bool [B, L] (True = real token) -> vectors float32 [B, d]
    decoder.onnx  ids int64 [B, T], memory float32 [B, d],
                  past_kv float32 [n_layers, 2, B, n_heads, P, head_dim]
                  -> logits float32 [B, T, V], present_kv float32 [n_layers, 2, B, n_heads, P+T, head_dim]
Position of ids[:, t] is P + t, position 0 is bos; P + T <= max_sentence_tokens + 1.
The first step feeds a past of length 0 (one decoder file does every step).

    sentence.onnx (optional; the manifest's sentence_file) one whole sentence in one run(): an ONNX
                  Loop over the decoder step for batch 1, with the repetition controls and the sampling
                  inside (inputs: SENTENCE_INPUTS, built by `sentence_feeds`)
                  -> tokens int64 [n], the last one eos unless max_tokens ended the sentence

The decode loop steps through `KVSteps` (plain `session.run`, numpy in and out). ONNX Runtime's
I/O binding with preallocated past/present buffers was measured against it and lost at this
size (the binding calls cost more than the copies they save: bench/edge_decoder.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from sllm.runtime.sampling import Picker
from sllm.sentences.sampling import SamplingConfig

if TYPE_CHECKING:  # the sessions come from runtime.providers; this module only calls run()
    import onnxruntime

ENCODER_INPUTS = ("ids", "mask")
ENCODER_OUTPUTS = ("vectors",)
DECODER_INPUTS = ("ids", "memory", "past_kv")
DECODER_OUTPUTS = ("logits", "present_kv")
SENTENCE_INPUTS = ("memory", "max_tokens", "controls", "penalty", "ngram", "history", "earlier", "greedy",
                   "temperature", "use_top_k", "top_k", "use_top_p", "top_p", "uniforms")
SENTENCE_OUTPUTS = ("tokens",)


def pad_batch(token_lists: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> ids int64 [B, Lmax] right-padded with pad_id, mask bool [B, Lmax]."""
    width = max((len(t) for t in token_lists), default=0)
    ids = np.full((len(token_lists), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(token_lists), width), dtype=bool)
    for row, toks in enumerate(token_lists):
        ids[row, : len(toks)] = toks
        mask[row, : len(toks)] = True
    return ids, mask


@dataclass(frozen=True)
class DecoderSpec:
    """What the decode loop needs to know about decoder.onnx (all of it is in the edge manifest)."""

    bos_id: int
    eos_id: int
    max_sentence_tokens: int
    n_layers: int
    n_heads: int
    head_dim: int

    def empty_kv(self, batch: int) -> np.ndarray:
        """The P = 0 cache: [n_layers, 2, batch, n_heads, 0, head_dim]."""
        return np.zeros((self.n_layers, 2, batch, self.n_heads, 0, self.head_dim), dtype=np.float32)


def encode(session: onnxruntime.InferenceSession, token_lists: list[list[int]], pad_id: int) -> np.ndarray:
    """Sentence vectors float32 [B, d], one per token list (each non-empty, <= max_sentence_tokens)."""
    if not token_lists:
        return np.zeros((0, session.get_outputs()[0].shape[-1]), dtype=np.float32)
    if any(len(t) == 0 for t in token_lists):
        raise ValueError("cannot encode an empty sentence")
    ids, mask = pad_batch(token_lists, pad_id)
    return session.run(list(ENCODER_OUTPUTS), {"ids": ids, "mask": mask})[0]


def decoder_step(session: onnxruntime.InferenceSession, ids: np.ndarray, memory: np.ndarray,
                 past_kv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One call of decoder.onnx: (logits [B, T, V], present_kv [n_layers, 2, B, H, P+T, hd])."""
    logits, present = session.run(list(DECODER_OUTPUTS), {
        "ids": np.ascontiguousarray(ids, dtype=np.int64),
        "memory": np.ascontiguousarray(memory, dtype=np.float32),
        "past_kv": np.ascontiguousarray(past_kv, dtype=np.float32)})
    return logits, present


class KVSteps:
    """Cached steps of a graph (ids [B, T], *fixed inputs, past_kv) -> (logits, present_kv) with the
    cache layout [n_layers, 2, B, n_heads, P, head_dim] (decoder.onnx; the baseline OPT's export in
    bench/), through `session.run`: the present of one step is the past of the next."""

    def __init__(self, session: onnxruntime.InferenceSession, kv_dims: tuple[int, int, int], batch: int,
                 max_len: int, fixed: dict[str, np.ndarray] | None = None):
        layers, heads, head_dim = kv_dims
        self.session, self.batch, self.max_len, self.past = session, batch, max_len, 0
        self.fixed = {k: np.ascontiguousarray(v) for k, v in (fixed or {}).items()}
        self._kv = np.zeros((layers, 2, batch, heads, 0, head_dim), dtype=np.float32)

    def kv(self) -> np.ndarray:
        """The cache so far, [n_layers, 2, B, n_heads, P, head_dim]."""
        return self._kv

    def run(self, ids: np.ndarray) -> np.ndarray:
        """One step: ids int64 [B, T] at positions P..P+T-1 -> logits (the graph's: [B, T, V])."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.past + ids.shape[1] > self.max_len:
            raise ValueError(f"{self.past} + {ids.shape[1]} positions exceed {self.max_len}")
        logits, self._kv = self.session.run(["logits", "present_kv"], {"ids": ids, **self.fixed, "past_kv": self._kv})
        self.past += ids.shape[1]
        return logits

    def keep(self, rows: np.ndarray, **fixed: np.ndarray) -> None:
        """Only `rows` (indices or a bool mask over the batch) go on; `fixed` rebinds inputs cut likewise."""
        self._kv = np.ascontiguousarray(self._kv[:, :, rows])
        self.batch = self._kv.shape[2]
        self.fixed.update({k: np.ascontiguousarray(v) for k, v in fixed.items()})


def greedy_decode(session: onnxruntime.InferenceSession, memory: np.ndarray, spec: DecoderSpec,
                  max_tokens: int | None = None) -> list[list[int]]:
    """Decode sentence vectors memory [B, d] greedily with the KV cache (see `decode_loop`)."""
    return decode_loop(session, memory, spec, lambda logits: logits.argmax(axis=-1), max_tokens)


def decode_loop(session: onnxruntime.InferenceSession, memory: np.ndarray, spec: DecoderSpec, pick,
                max_tokens: int | None = None, between: Callable[[], None] | None = None) -> list[list[int]]:
    """Decode sentence vectors memory [B, d] with decoder.onnx and its KV cache.

    The same loop as the torch `decode_sentences`: one token list per row without bos
    and eos; a row stops at eos or after min(max_tokens, max_sentence_tokens) tokens;
    finished rows leave the batch. `pick(logits [A, V]) -> ids [A]` chooses each next token
    (argmax, or the edge's sampling: one draw per live row per step). `between()`, when given, runs
    after each token step that leaves rows to decode (the cloud's model thread serves waiting work there).
    """
    memory = np.asarray(memory, dtype=np.float32)
    if memory.ndim != 2:
        raise ValueError(f"memory must be [batch, d], got shape {memory.shape}")
    if max_tokens is None:
        max_tokens = spec.max_sentence_tokens
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    limit = min(max_tokens, spec.max_sentence_tokens)  # no positions beyond max_sentence_tokens
    B = memory.shape[0]
    out: list[list[int]] = [[] for _ in range(B)]
    if B == 0 or limit == 0:
        return out
    rows = np.arange(B)  # original row of each live row
    step_in = np.full((B, 1), spec.bos_id, dtype=np.int64)  # [A, 1]
    kv_dims = (spec.n_layers, spec.n_heads, spec.head_dim)
    steps = KVSteps(session, kv_dims, B, limit, {"memory": memory})
    for _ in range(limit):
        logits = steps.run(step_in)  # [A, 1, V]; the cache grows by one position
        nxt = np.asarray(pick(logits[:, -1]))  # [A]
        live = nxt != spec.eos_id
        for r, tok in zip(rows[live].tolist(), nxt[live].tolist()):
            out[r].append(tok)
        if not live.any():
            break
        if not live.all():  # drop finished rows from the batch
            rows, memory, nxt = rows[live], memory[live], nxt[live]
            steps.keep(live, memory=memory)
        step_in = nxt[:, None].astype(np.int64)
        if between is not None:
            between()
    return out


def sentence_feeds(memory: np.ndarray, sampling: SamplingConfig, answer: Sequence[Sequence[int]],
                   limit: int) -> dict[str, np.ndarray]:
    """The inputs of sentence.onnx (SENTENCE_INPUTS) for one sentence of at most `limit` (>= 1) tokens
    from memory [d], by the rules of the per-token picker (sllm.runtime.sampling.Picker): the
    answer's tokens for the penalty and the n-grams, its sentences (-1 padded) for the no-repeat-
    sentence rule, and one uniform draw per step from the stream the picker draws from (a seeded
    generator per call), so a seed gives the per-token loop's tokens."""
    history = np.array([t for sentence in answer for t in sentence], dtype=np.int64)
    rows = [list(s) for s in answer] if sampling.no_repeat_sentence else []
    earlier = np.full((1 + len(rows), max([len(r) for r in rows] + [limit])), -1, dtype=np.int64)
    earlier[0] = -2  # a row that never matches: the graph never reduces an empty tensor
    for i, r in enumerate(rows, start=1):
        earlier[i, : len(r)] = r
    draws = np.zeros(limit) if sampling.greedy else np.random.default_rng(sampling.seed).random(limit)
    a = np.array
    return {
        "memory": np.asarray(memory, dtype=np.float32).reshape(1, -1), "max_tokens": a(limit, dtype=np.int64),
        "controls": a(sampling.controls_repetition), "penalty": a(sampling.repetition_penalty, dtype=np.float32),
        "ngram": a(sampling.no_repeat_ngram_size, dtype=np.int64), "history": history, "earlier": earlier,
        "greedy": a(sampling.greedy), "temperature": a(sampling.temperature or 1.0, dtype=np.float32),
        "use_top_k": a(sampling.top_k > 0), "top_k": a(sampling.top_k, dtype=np.int64),
        "use_top_p": a(sampling.top_p < 1.0), "top_p": a(sampling.top_p, dtype=np.float64), "uniforms": draws,
    }


def decode_sentence(session: onnxruntime.InferenceSession, memory: np.ndarray, spec: DecoderSpec,
                    sampling: SamplingConfig, answer: Sequence[Sequence[int]] = (),
                    max_tokens: int | None = None) -> list[int]:
    """One sentence from memory [d] with sentence.onnx in one run(): its tokens without eos, the
    tokens `decode_loop` gives with the edge's picker (tests/test_sentence_graph.py)."""
    limit = spec.max_sentence_tokens if max_tokens is None else min(max_tokens, spec.max_sentence_tokens)
    if limit < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if limit == 0:
        return []
    tokens = session.run(list(SENTENCE_OUTPUTS), sentence_feeds(memory, sampling, answer, limit))[0].tolist()
    if tokens and tokens[-1] == spec.eos_id:
        tokens.pop()
    return tokens


def decode_vectors(session: onnxruntime.InferenceSession, memory: np.ndarray, spec: DecoderSpec,
                   sampling: SamplingConfig, max_tokens: int | None = None, answer: Sequence[Sequence[int]] = (),
                   sentence: onnxruntime.InferenceSession | None = None) -> list[list[int]]:
    """Decode vectors memory [B, d] as the edge does; one token list per row (no bos/eos), every row
    continuing the same `answer`. One row with `sentence` (sentence.onnx's session): one run() for the
    whole sentence; otherwise decoder.onnx (`session`) in the per-token loop with `Picker`, the
    reference sentence.onnx is tested against (same tokens, same seeded draws)."""
    memory = np.asarray(memory, dtype=np.float32)
    if sentence is not None and memory.shape[0] == 1:
        return [decode_sentence(sentence, memory[0], spec, sampling, answer, max_tokens)]
    return decode_loop(session, memory, spec, Picker(sampling, spec.eos_id, answer, len(memory)), max_tokens)

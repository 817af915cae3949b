"""The edge sentence loop: one answer, sentence by sentence, over any cloud "stepper".

    prompt ids -> encoder.onnx -> stepper.append(prompt vectors) -> step (h_t, P(stop))
    repeat: stop? -> done; decoder.onnx(h_t) -> sentence (empty -> done); yield it;
            encoder.onnx(sentence) -> stepper.append(its vector) -> next step

"stop?" is the one stop rule (sllm.sentences.sampling.stop_decision): P(stop), calibrated at the
answer's position when the bundle has a stop calibration, >= the stop threshold (the bundle's, chosen
on validation, or the user's), or the termination head's argmax flag for a bundle without one; it is
not asked before `min_sentences` sentences (1: a prompt is often a paragraph by itself, and an answer
is a new one, not nothing).
The decoder sees the answer's earlier sentences, for the sampling's repetition controls
(sentences.sampling); with no_repeat_sentence, a sentence that still equals an earlier one (it
reached the token limit) ends the answer ("repeat").

This is the torch reference loop (`sllm.modeling.sllm_generate.SLLMGenerator.generate`) with the same
stop rules, and the edge's only one: chat and the Python API (`sllm.edge.chat.answer`, over the edge's
one remote stepper, `sllm.edge.remote.RemoteStepper`) and the bench (its own steppers: gRPC with
wire-byte counts, or the cloud engine in-process) all run it. Bench-only behaviour comes from wrapping the
stepper (bench.sllm_loop.PastStop: steps that never say stop) or from the consumer breaking out of
the iterator: a sentence is appended only after the consumer asks for the next event, so breaking
right after a sentence leaves it out of the context.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import numpy as np

from sllm.runtime.sampling import Sampling
from sllm.protos.client import StepResult
from sllm.sentences.sampling import MIN_ANSWER_SENTENCES, StopCalibration, stop_decision


class Stepper(Protocol):
    def append(self, vectors: np.ndarray) -> StepResult:
        """Append sentence vectors [n, d] float32 to the context; the step of the last one (the loop reads
        its hidden h_t, stop flag and P(stop))."""
        ...


@dataclass
class SentenceEvent:
    """One decoded sentence. Timings of the chain that made it: the edge encoded the vectors
    of the step that produced its h_t (the prompt, or the previous sentence), the cloud ran that
    step (round trip), the edge decoded h_t into this sentence."""

    turn: int
    index: int
    text: str
    ids: list[int]
    stop_probability: float  # P(stop) the termination head gave before this sentence
    edge_encode_ms: float
    cloud_step_ms: float
    edge_decode_ms: float


@dataclass
class TurnEnd:
    turn: int
    reason: str  # "stop" | "empty" | "repeat" | "max_sentences" | "context_full" | "interrupted"
    sentences: int
    prompt_sentences: int
    context_sentences: int  # sentences the context holds now (all turns)
    # the step after the last sentence event (of the prompt when there was none)
    edge_encode_ms: float
    cloud_step_ms: float
    edge_decode_ms: float  # the decode that came back empty ("empty") or repeated ("repeat"), else 0
    total_ms: float
    stop_probability: float  # of the last step


def _never() -> bool:
    return False


def sentence_loop(runtime, stepper: Stepper, prompt: list[list[int]], sampling: Sampling, *, room: int,
                  max_sentences: int | None = None, max_tokens: int | None = None, turn: int = 1,
                  context_used: int = 0, interrupted: Callable[[], bool] = _never, stop_threshold: float | None = None,
                  min_sentences: int = MIN_ANSWER_SENTENCES,
                  stop_calibration: StopCalibration | None = None) -> Iterator[SentenceEvent | TurnEnd]:
    """One answer to `prompt` (token ids of its sentences): yields each sentence as soon as it is
    decoded, then one TurnEnd.

    runtime: encode(list of id lists) -> [n, d]; decode(h, sampling, max_tokens) -> .ids .text .ms
    room: sentences the context can take after the prompt; max_sentences: per answer (None = room).
    context_used: sentences the context held before the prompt (for TurnEnd.context_sentences).
    stop_threshold: stop when P(stop) >= it (P(stop) calibrated by `stop_calibration`, when given, at the
    answer's position); None: the step's own stop flag (argmax). The stop rule applies from sentence
    `min_sentences` on.
    interrupted(): checked before each sentence; True ends the answer ("interrupted") after the
    sentence decoded last has been appended, so the context holds what the consumer saw.
    Sentence i samples with `sampling.for_sentence(i)` (seed + i)."""
    cap = room if max_sentences is None else min(max_sentences, room)
    at_cap = "max_sentences" if max_sentences is not None and max_sentences <= room else "context_full"
    t_turn = time.perf_counter()
    step, encode_ms, step_ms = _encode_and_append(runtime, stepper, prompt)
    reason, n, appended, empty_ms = at_cap, 0, 0, 0.0
    said: list[list[int]] = []  # this answer's sentences (the repetition controls read them)
    for i in range(max(cap, 0)):
        if interrupted():
            reason = "interrupted"
            break
        if i >= min_sentences and stop_decision(step.stop, step.stop_probability, stop_threshold,
                                                stop_calibration, i):
            reason = "stop"
            break
        answer = {"answer": said} if sampling.controls_repetition else {}  # runtimes without controls: as before
        decoded = runtime.decode(step.hidden, sampling.for_sentence(i), max_tokens, **answer)
        if not decoded.ids:  # eos straight away: nothing left to say
            reason, empty_ms = "empty", decoded.ms
            break
        if sampling.no_repeat_sentence and decoded.ids in said:  # the guard could not avoid it (token limit)
            reason, empty_ms = "repeat", decoded.ms
            break
        said.append(decoded.ids)
        yield SentenceEvent(turn, i, decoded.text, decoded.ids, float(step.stop_probability), encode_ms, step_ms,
                            decoded.ms)
        n += 1
        step, encode_ms, step_ms = _encode_and_append(runtime, stepper, [decoded.ids])
        appended += 1
    if reason == at_cap and interrupted():
        reason = "interrupted"
    yield TurnEnd(turn, reason, n, len(prompt), context_used + len(prompt) + appended, encode_ms, step_ms, empty_ms,
                  (time.perf_counter() - t_turn) * 1e3, float(step.stop_probability))


def _encode_and_append(runtime, stepper: Stepper, ids: list[list[int]]) -> tuple[StepResult, float, float]:
    """encoder.onnx then one cloud step: (the step, encode ms, step ms)."""
    t0 = time.perf_counter()
    vectors = runtime.encode(ids)
    t1 = time.perf_counter()
    step = stepper.append(vectors)
    return step, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3

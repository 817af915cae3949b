"""One timed SLLM generation: the edge sentence loop (`sllm.edge.loop.sentence_loop`, as edge-chat runs
it), with the cloud half either behind gRPC (a real server), called in this process (the engine), or
behind the edge's own stepper speculating (edge.remote.RemoteStepper against a guessing server).

    prompt sentences -> encoder.onnx -> cloud step (prefill) -> h_1
    repeat: decoder.onnx(h_t) -> a sentence; encoder.onnx(sentence) -> cloud step -> h_t+1

Differences from a chat turn, both deliberate: the termination head's stop flag is ignored and
generation runs until the output holds >= `min_tokens` tokens (the baseline is likewise forced
to a fixed length with min_new_tokens), and the last sentence is not appended (nothing would read
its h): the run stops reading the loop right after that sentence. Greedy decoding. Output tokens
are the tokens of the sentences actually decoded (no bos or eos), so the count is whatever the
SLLM produced, a little over `min_tokens`.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass

import numpy as np

from sllm.edge.loop import TurnEnd, sentence_loop
from sllm.runtime.sampling import Sampling
from sllm.sentences.sampling import AnswerOptions
from sllm.protos.v1 import sllm_pb2 as pb
from sllm.protos.wire import pack


@dataclass(frozen=True)
class _GoOn:
    """A step with the termination head's flag off; its P(stop) as the head gave it."""

    hidden: np.ndarray
    stop_probability: float
    stop: bool = False


class PastStop:
    """A stepper whose steps never say stop: the edge sentence loop, run without a stop threshold,
    then generates past the termination head (the fixed-length runs; P(stop) is still reported)."""

    def __init__(self, stepper):
        self.stepper = stepper

    def append(self, vectors: np.ndarray) -> _GoOn:
        step = self.stepper.append(vectors)
        return _GoOn(step.hidden, float(step.stop_probability))


def past_stop_options(room: int) -> AnswerOptions:
    """How a fixed-length run decodes, for the Decoding a guessing cloud gets with the prompt: greedy,
    no repetition controls, no cap, and the stop rule never asked within the answer's `room` sentences,
    so the cloud guesses past its stop head as the run decodes past it."""
    return AnswerOptions(repetition_penalty=1.0, no_repeat_ngram_size=0, no_repeat_sentence=False, max_sentences=0,
                         min_sentences=room)


class GrpcStepper:
    """Cloud steps over one Converse stream of a running server (protos.client, as edge-chat uses
    it); `wire` holds (request bytes, reply bytes) of every step since `open` (every stepper here has
    one entry per append; None where its bytes are not measured)."""

    def __init__(self, client, model_id: str, d: int, dtype: str = "float16"):
        self.client, self.model_id, self.d, self.dtype = client, model_id, d, dtype
        self.conv = None
        self.wire: list[tuple[int, int]] = []

    def open(self) -> None:
        self.conv = self.client.conversation(self.model_id, self.d, dtype=self.dtype, reply_dtype=self.dtype)
        self.wire = []

    def append(self, vectors: np.ndarray):
        r = self.conv.append(vectors)
        # the very messages protos.client sent and the server answered, rebuilt to measure their size
        request = pb.ClientMessage(append=pb.Append(vectors=pack(vectors, self.dtype)))
        reply = pb.ServerMessage(step=pb.Step(hidden=pack(r.hidden, self.dtype), stop=r.stop,
                                              stop_probability=r.stop_probability, past_length=r.past_length))
        self.wire.append((request.ByteSize(), reply.ByteSize()))
        return r

    def close(self) -> None:
        if self.conv is not None and not self.conv.finished:
            self.conv.close()
        self.conv = None


class EngineStepper:
    """Cloud steps by the cloud engine in this process: the same forward pass the server batches,
    without gRPC, the session store and the batcher thread (so no wire bytes: zeros in `wire`)."""

    def __init__(self, engine):
        self.engine = engine
        self.slot = None
        self.wire: list[tuple[int, int]] = []

    def open(self) -> None:
        self.slot = self.engine.new_slot()
        self.wire = []

    def append(self, vectors: np.ndarray):
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.engine.d)
        out = self.engine.forward([self.slot], [vectors])[0]
        self.slot.length += len(vectors)
        self.wire.append((0, 0))
        return out

    def close(self) -> None:
        self.slot = None


class SpeculatingStepper:
    """The edge's own stepper (edge.remote.RemoteStepper) with sentence-level speculation, opened for
    each run as bench.rtt.SLLMRunner opens it (a session on a fresh channel, the speculation depth
    asked for granted, or an error). Wire bytes are not measured: the cloud's guesses stream in between
    the appends. `stats` (edge.speculate.SpeculationStats) of the last run, once it is closed."""

    def __init__(self, runner):
        self.runner = runner  # a bench.rtt.SLLMRunner built with speculate=N
        self.remote = None
        self.stats = None
        self.wire: list[tuple[int, int] | None] = []

    def open(self) -> None:
        self.remote = self.runner.open_stepper()
        self.stats, self.wire = None, []

    def begin_turn(self, options) -> None:
        self.remote.begin_turn(options)

    def append(self, vectors: np.ndarray):
        step = self.remote.append(vectors)
        self.wire.append(None)
        return step

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
            self.stats = self.remote.speculation.stats
        self.remote = None


@dataclass
class SLLMRun:
    prompt_sentences: int
    prompt_tokens: int
    tokens: int  # output tokens produced after the prefill
    sentences: int  # output sentences
    prefill_s: float  # encode the prompt + its cloud step
    gen_s: float  # from h_1 to the last decoded sentence
    encode_s: float  # within gen_s: edge encoder
    step_s: float  # within gen_s: cloud steps (round trips over gRPC, or engine calls)
    decode_s: float  # within gen_s: edge decoder (incl. detokenizing)
    cloud_steps: int  # within gen_s: one per generated sentence but the last
    prefill_bytes: int | None  # None: the stepper does not measure its wire bytes
    request_bytes: int | None  # within gen_s, all steps
    reply_bytes: int | None
    ended: str  # "length" (reached min_tokens), "empty" (eos at once), "context" (session full)
    output: str  # digest of the output sentences' token ids: runs of one prompt on two paths compare equal

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.gen_s if self.gen_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


_ENDED = {"empty": "empty", "context_full": "context"}  # the loop's reasons in this report's words


def generate(runtime, stepper, prompt: list[list[int]], min_tokens: int, max_sentences: int) -> SLLMRun:
    """Run one prompt (token lists of its sentences) until >= min_tokens output tokens, in a context
    of `max_sentences` sentences; times each part."""
    stepper.open()
    try:
        t0 = time.perf_counter()
        room = max_sentences - len(prompt)
        if isinstance(stepper, SpeculatingStepper):
            stepper.begin_turn(past_stop_options(room))
        events = sentence_loop(runtime, PastStop(stepper), prompt, Sampling(), room=room)
        tokens, ms, ended = 0, {"prefill": 0.0, "encode": 0.0, "step": 0.0, "decode": 0.0}, "length"
        digest = hashlib.sha1()
        for ev in events:
            # an event's encode + step made its h_t: the prompt's (the prefill) for the first
            first = ev.sentences == 0 if isinstance(ev, TurnEnd) else ev.index == 0
            if first:
                ms["prefill"] += ev.edge_encode_ms + ev.cloud_step_ms
            else:
                ms["encode"] += ev.edge_encode_ms
                ms["step"] += ev.cloud_step_ms
            ms["decode"] += ev.edge_decode_ms
            if isinstance(ev, TurnEnd):
                ended = _ENDED[ev.reason]
                break
            tokens += len(ev.ids)
            digest.update(repr(list(ev.ids)).encode())  # per sentence: the same tokens cut elsewhere differ
            if tokens >= min_tokens:
                break  # before the loop appends this sentence
            if ev.index + 1 == room:  # the context is full: nothing would read the last sentence's step
                ended = "context"
                break
        total_s = time.perf_counter() - t0
        sentences = ev.sentences if isinstance(ev, TurnEnd) else ev.index + 1
        events.close()
    finally:
        stepper.close()
    prefill_wire, gen_wire = stepper.wire[0], stepper.wire[1:]
    if None in stepper.wire:
        wire = (None, None, None)
    else:
        wire = (sum(prefill_wire), sum(r for r, _ in gen_wire), sum(r for _, r in gen_wire))
    return SLLMRun(len(prompt), sum(len(s) for s in prompt), tokens, sentences, ms["prefill"] / 1e3,
                   total_s - ms["prefill"] / 1e3, ms["encode"] / 1e3, ms["step"] / 1e3, ms["decode"] / 1e3,
                   len(gen_wire), *wire, ended, digest.hexdigest()[:16])

"""One timed SLLM generation: the edge loop of `edge.chat.ChatSession.turn`, with the cloud half
either behind gRPC (a real server) or called in this process (the engine, no wire).

    prompt sentences -> encoder.onnx -> cloud step (prefill) -> h_1
    repeat: decoder.onnx(h_t) -> a sentence; encoder.onnx(sentence) -> cloud step -> h_t+1

Differences from a chat turn, both deliberate: the termination head's stop flag is ignored and
generation runs until the output holds >= `min_tokens` tokens (the baseline is likewise forced
to a fixed length with min_new_tokens), and the last sentence is not appended (nothing would read
its h). Greedy decoding. Output tokens are the tokens of the sentences actually decoded (no bos or
eos), so the count is whatever the SLLM produced, a little over `min_tokens`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from edge.sampling import Sampling
from protos.sllm.v1 import sllm_pb2 as pb
from protos.wire import pack


@dataclass
class StepAnswer:
    hidden: np.ndarray  # [d] float32
    request_bytes: int  # serialized ClientMessage that carried the vectors (0 in-process)
    reply_bytes: int  # serialized ServerMessage that carried h (0 in-process)


class GrpcStepper:
    """Cloud steps over one Converse stream of a running server (protos.client, as edge-chat uses it)."""

    def __init__(self, client, model_id: str, d: int, dtype: str = "float16"):
        self.client, self.model_id, self.d, self.dtype = client, model_id, d, dtype
        self.conv = None

    def open(self) -> None:
        self.conv = self.client.conversation(self.model_id, self.d, dtype=self.dtype, reply_dtype=self.dtype)

    def step(self, vectors: np.ndarray) -> StepAnswer:
        r = self.conv.append(vectors)
        # the very messages protos.client sent and the server answered, rebuilt to measure their size
        request = pb.ClientMessage(append=pb.Append(vectors=pack(vectors, self.dtype)))
        reply = pb.ServerMessage(step=pb.Step(hidden=pack(r.hidden, self.dtype), stop=r.stop,
                                              stop_probability=r.stop_probability, past_length=r.past_length))
        return StepAnswer(r.hidden, request.ByteSize(), reply.ByteSize())

    def close(self) -> None:
        if self.conv is not None and not self.conv.finished:
            self.conv.close()
        self.conv = None


class EngineStepper:
    """Cloud steps by the cloud engine in this process: the same forward pass the server batches,
    without gRPC, the session store and the batcher thread."""

    def __init__(self, engine):
        self.engine = engine
        self.kv = None

    def open(self) -> None:
        self.kv = None

    def step(self, vectors: np.ndarray) -> StepAnswer:
        out = self.engine.forward([self.kv], [np.asarray(vectors, dtype=np.float32).reshape(-1, self.engine.d)])[0]
        self.kv = out.kv
        return StepAnswer(out.hidden, 0, 0)

    def close(self) -> None:
        self.kv = None


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
    prefill_bytes: int
    request_bytes: int  # within gen_s, all steps
    reply_bytes: int
    ended: str  # "length" (reached min_tokens), "empty" (eos at once), "context" (session full)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.gen_s if self.gen_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def generate(runtime, stepper, prompt: list[list[int]], min_tokens: int, max_sentences: int) -> SLLMRun:
    """Run one prompt (token lists of its sentences) until >= min_tokens output tokens; times each part."""
    greedy = Sampling()
    pc = time.perf_counter
    stepper.open()
    try:
        t0 = pc()
        answer = stepper.step(runtime.encode(prompt))
        t_gen = pc()
        prefill_s, prefill_bytes = t_gen - t0, answer.request_bytes + answer.reply_bytes
        tokens = sentences = steps = req = rep = 0
        enc = stp = dec = 0.0
        room = max_sentences - len(prompt)
        ended = "length"
        while True:
            t = pc()
            decoded = runtime.decode(answer.hidden, greedy)
            dec += pc() - t
            if not decoded.ids:
                ended = "empty"
                break
            tokens += len(decoded.ids)
            sentences += 1
            if tokens >= min_tokens:
                break
            if sentences >= room:
                ended = "context"
                break
            t = pc()
            vec = runtime.encode([decoded.ids])
            t2 = pc()
            answer = stepper.step(vec)
            t3 = pc()
            enc, stp, steps = enc + (t2 - t), stp + (t3 - t2), steps + 1
            req, rep = req + answer.request_bytes, rep + answer.reply_bytes
        gen_s = pc() - t_gen
    finally:
        stepper.close()
    return SLLMRun(len(prompt), sum(len(s) for s in prompt), tokens, sentences, prefill_s, gen_s, enc, stp, dec,
                   steps, prefill_bytes, req, rep, ended)

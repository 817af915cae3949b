"""A thin client for the sllm cloud service: numpy + grpc + the generated stubs, no torch.

    with CloudClient("127.0.0.1:50051", token="...") as cloud:
        info = cloud.model_info()
        with cloud.conversation(model_id=info.model_id, dim=info.dim) as conv:
            step = conv.append(prompt_vectors)          # [n, d]: h_t + stop decision
            while not step.stop:
                step = conv.append(encode(decode(step.hidden)))
"""
from __future__ import annotations

import queue
from dataclasses import dataclass

import grpc
import numpy as np

from protos.sllm.v1 import sllm_pb2 as pb
from protos.sllm.v1 import sllm_pb2_grpc as pb_grpc
from protos.wire import pack, unpack, wire_dtype

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
_END = object()


class CloudError(RuntimeError):
    """A call that ended with a non-OK gRPC status (code + the server's message)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> "CloudError":
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = e.details() if hasattr(e, "details") else str(e)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


@dataclass
class StepResult:
    hidden: np.ndarray  # [d] float32: h_t, to be decoded into the next sentence
    stop: bool  # the termination head says the answer is finished
    stop_probability: float
    past_length: int  # sentences in the session after this step


def step_result(msg: pb.Step) -> StepResult:
    return StepResult(unpack(msg.hidden, what="hidden")[0], msg.stop, msg.stop_probability, msg.past_length)


def make_channel(target: str, *, tls: bool = False, root_certificates: bytes | None = None,
                 server_name: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 options: tuple = ()) -> grpc.Channel:
    opts = [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes), *options]
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    if tls or root_certificates is not None:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root_certificates), opts)
    return grpc.insecure_channel(target, opts)


class CloudClient:
    def __init__(self, target: str, token: str | None = None, *, tls: bool = False,
                 root_certificates: bytes | None = None, server_name: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, channel: grpc.Channel | None = None):
        self.channel = channel or make_channel(target, tls=tls, root_certificates=root_certificates,
                                               server_name=server_name, max_message_bytes=max_message_bytes)
        self.stub = pb_grpc.SentenceLMStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def model_info(self, timeout: float | None = 10.0) -> pb.ModelInfo:
        try:
            return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise CloudError.from_rpc(e) from None

    def stats(self, timeout: float | None = 10.0) -> pb.Stats:
        try:
            return self.stub.GetStats(pb.GetStatsRequest(), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise CloudError.from_rpc(e) from None

    def conversation(self, model_id: str, dim: int, *, session_id: str = "", history=None,
                     dtype: str = "float32", reply_dtype: str = "float32",
                     timeout: float | None = None) -> "Conversation":
        """Open a stream and its session (new, resumed, or rebuilt from `history` [n, d])."""
        return Conversation(self, model_id, dim, session_id=session_id, history=history, dtype=dtype,
                            reply_dtype=reply_dtype, timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "CloudClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Conversation:
    """One Converse stream: `append` vectors, get the step back; `close(keep=...)` or `cancel()`."""

    def __init__(self, client: CloudClient, model_id: str, dim: int, *, session_id: str = "", history=None,
                 dtype: str = "float32", reply_dtype: str = "float32", timeout: float | None = None):
        self.dim, self.dtype = dim, dtype
        self._requests: queue.Queue = queue.Queue()
        self._call = client.stub.Converse(iter(self._requests.get, _END), timeout=timeout,
                                          metadata=client.metadata)
        self.finished = False
        hist = pack(history, dtype) if history is not None and len(history) else None
        opened = self._send(pb.ClientMessage(open=pb.Open(
            model_id=model_id, dim=dim, session_id=session_id, history=hist,
            reply_dtype=wire_dtype(reply_dtype))), "opened").opened
        self.session_id = opened.session_id
        self.past_length = opened.past_length
        self.resumed = opened.resumed
        self.remaining_sentences = opened.remaining_sentences
        self.last: StepResult | None = step_result(opened.last) if opened.HasField("last") else None

    def _send(self, msg: pb.ClientMessage, expect: str) -> pb.ServerMessage:
        if self.finished:
            raise RuntimeError("this conversation's stream has ended")
        self._requests.put(msg)
        try:
            reply = next(self._call)
        except grpc.RpcError as e:
            self._end()
            raise CloudError.from_rpc(e) from None
        except StopIteration:
            self._end()
            raise CloudError(grpc.StatusCode.UNKNOWN, "the server ended the stream without an answer") from None
        if reply.WhichOneof("kind") != expect:
            self.cancel()
            raise CloudError(grpc.StatusCode.INTERNAL, f"expected {expect!r}, got {reply.WhichOneof('kind')!r}")
        return reply

    def append(self, vectors) -> StepResult:
        """Send sentence vectors ([d] or [n, d]); returns the step for the last one."""
        step = step_result(self._send(pb.ClientMessage(append=pb.Append(vectors=pack(vectors, self.dtype))),
                                      "step").step)
        self.past_length = step.past_length
        self.last = step
        return step

    def close(self, keep: bool = False) -> bool:
        """End the stream; keep=True leaves the session on the server for a later resume."""
        reply = self._send(pb.ClientMessage(close=pb.Close(keep=keep)), "closed")
        self._end()
        for _ in self._call:  # the server ends the stream after Closed
            pass
        return reply.closed.kept

    def _end(self) -> None:
        """The stream is over: unblock grpc's request-reading thread (it waits on the queue)."""
        if not self.finished:
            self.finished = True
            self._requests.put(_END)

    def cancel(self) -> None:
        """Cancel the stream; the server frees the session at once."""
        self._end()
        self._call.cancel()

    def __enter__(self) -> "Conversation":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.finished:
            return
        if exc_type is None:
            self.close()
        else:
            self.cancel()

"""A thin client for the sllm cloud service: numpy + grpc + the generated stubs, no torch.

    with CloudClient("127.0.0.1:50051", token="...") as cloud:
        info = cloud.model_info()
        with cloud.conversation(model_id=info.model_id, dim=info.dim, step_timeout=30) as conv:
            step = conv.append(prompt_vectors)          # [n, d]: h_t + stop decision
            while not step.stop:
                step = conv.append(encode(decode(step.hidden)))

Deadlines and keepalive: `step_timeout` bounds every round trip on a conversation's stream (Open,
each Append, Close): a reply that does not come in time cancels the stream and raises
CloudError(DEADLINE_EXCEEDED). The channel pings the server every `keepalive_s` seconds while a
call is open, idle or not (grpc.http2.max_pings_without_data = 0), and drops the connection when a
ping is not answered within min(10 s, keepalive_s): a server host that vanished ends the stream
(UNAVAILABLE) instead of leaving it open forever. The server must accept pings that often: the
sllm-cloud server allows one every 10 s (grpc.http2.min_ping_interval_without_data_ms); gRPC's
default server policy allows one every 5 minutes and answers faster pings on an idle connection
with GOAWAY "too_many_pings" (then pass keepalive_s=0, or >= 300).
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import grpc
import numpy as np

from sllm.protos.errors import UNSPECIFIED, reason_of
from sllm.protos.v1 import sllm_pb2 as pb
from sllm.protos.v1 import sllm_pb2_grpc as pb_grpc
from sllm.protos.wire import pack, unpack, wire_dtype

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
# metadata every call of one conversation carries: a random key the edge picks per conversation, for
# a load balancer to hash on (affinity: its reconnects land on the replica holding its session). The
# server ignores it.
SESSION_KEY_HEADER = "x-sllm-session-key"
DEFAULT_KEEPALIVE_S = 30.0  # >= the sllm-cloud server's 10 s minimum between pings without data
MAX_KEEPALIVE_TIMEOUT_S = 10.0
_END = object()
_INT_MAX = 2**31 - 1  # the largest integer channel argument


class CloudError(RuntimeError):
    """A call that ended with a non-OK gRPC status: the code, the server's message (for people) and its
    ErrorReason (protos.errors; UNSPECIFIED: the status did not come from the service)."""

    def __init__(self, code: grpc.StatusCode, details: str, reason: int = UNSPECIFIED):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.reason = code, details, reason

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> "CloudError":
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = e.details() if hasattr(e, "details") else str(e)
        trailing = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", reason_of(trailing))


@dataclass
class StepResult:
    hidden: np.ndarray | None  # [d] float32: h_t, to be decoded into the next sentence (None: declined)
    stop: bool  # the termination head says the answer is finished
    stop_probability: float
    past_length: int  # sentences in the session after this step
    speculative: bool = False  # the cloud took this step on its own guess of the input (`assumed`)
    assumed: np.ndarray | None = None  # [d] float32: that guess
    epoch: int = 0
    declined: bool = False  # a speculative notice: the cloud will not guess the input at past_length - 1


def step_result(msg: pb.Step) -> StepResult:
    hidden = unpack(msg.hidden, what="hidden")[0] if not msg.declined else None
    assumed = unpack(msg.assumed, what="assumed")[0] if msg.HasField("assumed") else None
    return StepResult(hidden, msg.stop, msg.stop_probability, msg.past_length, msg.speculative, assumed, msg.epoch,
                      msg.declined)


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, keepalive_s: float = DEFAULT_KEEPALIVE_S,
                    server_name: str | None = None, options: tuple = ()) -> list[tuple[str, object]]:
    """The channel arguments `make_channel` uses (keepalive_s <= 0: no keepalive pings)."""
    opts = [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]
    if keepalive_s > 0:
        timeout_ms = round(min(MAX_KEEPALIVE_TIMEOUT_S, keepalive_s) * 1000)
        opts += [("grpc.keepalive_time_ms", round(min(keepalive_s * 1000, _INT_MAX))),
                 ("grpc.keepalive_timeout_ms", timeout_ms),
                 # any ping unanswered this long is a dead connection: gRPC's flow-control (BDP) ping,
                 # sent when a reply arrives, otherwise holds back the keepalive ping for a minute
                 ("grpc.http2.ping_timeout_ms", timeout_ms),
                 ("grpc.http2.max_pings_without_data", 0),  # keep pinging a stream idle between turns
                 ("grpc.keepalive_permit_without_calls", 0)]  # no calls, no pings (any server accepts that)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return [*opts, *options]


def make_channel(target: str, *, tls: bool = False, root_certificates: bytes | None = None,
                 private_key: bytes | None = None, certificate_chain: bytes | None = None,
                 server_name: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 keepalive_s: float = DEFAULT_KEEPALIVE_S, options: tuple = ()) -> grpc.Channel:
    """A channel to `target`: TLS when `tls` or any certificate is given (root_certificates: the CA
    to trust, else the system's; private_key + certificate_chain: this client's certificate, for
    a server that requires one), with keepalive pings every `keepalive_s` seconds (0: none)."""
    opts = channel_options(max_message_bytes, keepalive_s, server_name, options)
    if tls or root_certificates is not None or certificate_chain is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates, private_key=private_key,
                                                   certificate_chain=certificate_chain)
        return grpc.secure_channel(target, credentials, opts)
    return grpc.insecure_channel(target, opts)


class CloudClient:
    def __init__(self, target: str, token: str | None = None, *, tls: bool = False,
                 root_certificates: bytes | None = None, server_name: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, channel: grpc.Channel | None = None,
                 session_key: str | None = None):
        self.channel = channel or make_channel(target, tls=tls, root_certificates=root_certificates,
                                               server_name=server_name, max_message_bytes=max_message_bytes)
        self.stub = pb_grpc.SentenceLMStub(self.channel)
        self.auth = (("authorization", f"Bearer {token}"),) if token else ()
        self.session_key = session_key  # sent as SESSION_KEY_HEADER on every call (a balancer's affinity)

    @property
    def metadata(self) -> tuple:
        return (*self.auth, *(((SESSION_KEY_HEADER, self.session_key),) if self.session_key else ()))

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
                     dtype: str = "float32", reply_dtype: str = "float32", timeout: float | None = None,
                     step_timeout: float | None = None, keep_on_disconnect: bool = False,
                     speculate: int = 0) -> "Conversation":
        """Open a stream and its session (new, resumed, or rebuilt from `history` [n, d]). timeout:
        the whole stream's deadline; step_timeout: each round trip's (Open, Append, Close);
        keep_on_disconnect: the server keeps the session (detached) if the stream is cut, so a
        reconnect with its id and history resumes it; speculate: sentences the cloud may run ahead
        (sentence-level speculation, see Conversation)."""
        return Conversation(self, model_id, dim, session_id=session_id, history=history, dtype=dtype,
                            reply_dtype=reply_dtype, timeout=timeout, step_timeout=step_timeout,
                            keep_on_disconnect=keep_on_disconnect, speculate=speculate)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "CloudClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Conversation:
    """One Converse stream: `append` vectors, get the step back; `close(keep=...)` or `cancel()`.

    A reader thread takes the server's messages off the stream as they come, so that each round
    trip can wait for its reply at most `step_timeout` seconds (None: no limit).

    Speculation (speculate > 0, granted in `self.speculate`): the server also streams speculative
    steps; they wait here until `speculative_step(n)` takes the one for context length n. `append`
    (with `position`: a new turn or a correction) drops those of older epochs; `accept(position)`
    confirms a guess without a round trip. `confirmed` counts the sentences this edge stands behind."""

    def __init__(self, client: CloudClient, model_id: str, dim: int, *, session_id: str = "", history=None,
                 dtype: str = "float32", reply_dtype: str = "float32", timeout: float | None = None,
                 step_timeout: float | None = None, keep_on_disconnect: bool = False, speculate: int = 0):
        self.dim, self.dtype = dim, dtype
        self.step_timeout = min(step_timeout, threading.TIMEOUT_MAX) if step_timeout and step_timeout > 0 else None
        self._requests: queue.Queue = queue.Queue()
        self._replies: queue.Queue = queue.Queue()
        self._call = client.stub.Converse(iter(self._requests.get, _END), timeout=timeout,
                                          metadata=client.metadata)
        self.finished = False
        self._reader = threading.Thread(target=self._read, name="sllm-converse-reader", daemon=True)
        self._reader.start()
        hist = pack(history, dtype) if history is not None and len(history) else None
        opened = self._send(pb.ClientMessage(open=pb.Open(
            model_id=model_id, dim=dim, session_id=session_id, history=hist,
            reply_dtype=wire_dtype(reply_dtype), keep_on_disconnect=keep_on_disconnect,
            speculate=speculate)), "opened").opened
        self.session_id = opened.session_id
        self.past_length = opened.past_length
        self.resumed = opened.resumed
        self.remaining_sentences = opened.remaining_sentences
        self.last: StepResult | None = step_result(opened.last) if opened.HasField("last") else None
        self.speculate, self.speculate_note = opened.speculate, opened.speculate_note
        self.confirmed = opened.past_length  # sentences sent or accepted
        self.epoch = self.last.epoch if self.last is not None else 0
        self._ahead: list[StepResult] = []  # speculative steps received, not taken yet

    def _read(self) -> None:
        """The reader thread: every reply, then how the stream ended (_END, or the RpcError)."""
        try:
            for reply in self._call:
                self._replies.put(reply)
            self._replies.put(_END)
        except grpc.RpcError as e:
            self._replies.put(e)

    def _send(self, msg: pb.ClientMessage, expect: str) -> pb.ServerMessage:
        if self.finished:
            raise RuntimeError("this conversation's stream has ended")
        self._requests.put(msg)
        while True:
            reply = self._receive(f"no reply to {msg.WhichOneof('kind')}")
            if reply.WhichOneof("kind") == "step" and reply.step.speculative:
                self._ahead.append(step_result(reply.step))  # sorted out by the answer's epoch
                continue
            if reply.WhichOneof("kind") != expect:
                self.cancel()
                raise CloudError(grpc.StatusCode.INTERNAL, f"expected {expect!r}, got {reply.WhichOneof('kind')!r}")
            return reply

    def _receive(self, what: str) -> pb.ServerMessage:
        """The next message from the server within the step deadline; CloudError for the end of the stream."""
        try:
            reply = self._replies.get(timeout=self.step_timeout)
        except queue.Empty:
            self.cancel()
            raise CloudError(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"{what} within the step deadline of {self.step_timeout:g} s") from None
        if isinstance(reply, grpc.RpcError):
            self._end()
            raise CloudError.from_rpc(reply)
        if reply is _END:
            self._end()
            raise CloudError(grpc.StatusCode.UNKNOWN, "the server ended the stream without an answer")
        return reply

    def speculative_step(self, past_length: int) -> StepResult:
        """The speculative step (or the cloud's "declined" notice) for context length `past_length` in the
        current epoch, waiting for it if it has not come yet."""
        while True:
            for i, step in enumerate(self._ahead):
                if step.epoch == self.epoch and step.past_length == past_length:
                    del self._ahead[:i + 1]  # what came before it is stale or taken
                    return step
            reply = self._receive(f"no speculative step for sentence {past_length}")
            if reply.WhichOneof("kind") != "step" or not reply.step.speculative:
                self.cancel()
                raise CloudError(grpc.StatusCode.INTERNAL,
                                 f"expected a speculative step, got {reply.WhichOneof('kind')!r}")
            self._ahead.append(step_result(reply.step))

    def accept(self, position: int) -> None:
        """Confirm the cloud's guess of the sentence at `position` (no reply: no round trip)."""
        if self.finished:
            raise RuntimeError("this conversation's stream has ended")
        self._requests.put(pb.ClientMessage(accept=pb.Accept(position=position)))
        self.confirmed = position + 1

    def append(self, vectors, position: int | None = None, decoding: pb.Decoding | None = None) -> StepResult:
        """Send sentence vectors ([d] or [n, d]) at `position` (None: after the confirmed ones; what the
        cloud holds from `position` on is dropped first); returns the step for the last one. `decoding`:
        how this turn's answer is decoded (on a turn's first Append, for the cloud's guesses)."""
        append = pb.Append(vectors=pack(vectors, self.dtype))
        if position is not None:
            append.position = position
        if decoding is not None:
            append.decoding.CopyFrom(decoding)
        step = step_result(self._send(pb.ClientMessage(append=append), "step").step)
        self.past_length = self.confirmed = step.past_length
        self.last = step
        self.epoch = step.epoch  # speculative steps of this epoch after this one stay; the rest are stale
        self._ahead = [s for s in self._ahead if s.epoch == step.epoch and s.past_length > step.past_length]
        return step

    def close(self, keep: bool = False) -> bool:
        """End the stream; keep=True leaves the session on the server for a later resume."""
        reply = self._send(pb.ClientMessage(close=pb.Close(keep=keep)), "closed")
        self._end()
        self._reader.join(self.step_timeout)  # the server ends the stream after Closed
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

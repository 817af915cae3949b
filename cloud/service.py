"""The SentenceLM servicer: Converse (one conversation per stream), GetModelInfo, GetStats."""
from __future__ import annotations

import logging
import threading

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from cloud.batcher import Batcher, Job
from cloud.config import ServerConfig
from cloud.engine import Engine, StepOutput
from cloud.errors import ServiceError, invalid, precondition, unavailable
from cloud.jsonlog import log
from cloud.metrics import Metrics
from cloud.sessions import Session, SessionStore, check_session_id
from protos.sllm.v1 import sllm_pb2 as pb
from protos.sllm.v1 import sllm_pb2_grpc as pb_grpc
from protos.wire import NUMPY_DTYPES, WireError, pack, unpack

POLL_S = 1.0  # how often a waiting stream checks that the model thread is alive


class _StreamEnded(Exception):
    """The RPC ended (cancel, deadline, disconnect, eviction) while this handler was working."""


def end_stream_with_status(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End an RPC from another thread with a status code and message (falls back to a plain cancel)."""
    try:
        context._rpc_event.call.cancel(code.value[0], details)  # noqa: SLF001 - grpc has no public API for this
    except Exception:  # noqa: BLE001
        context.cancel()


def parse_client_message(raw: bytes) -> pb.ClientMessage:
    """Converse takes raw bytes (no grpc deserializer) so that garbage is INVALID_ARGUMENT, not INTERNAL."""
    try:
        return pb.ClientMessage.FromString(raw)
    except DecodeError as e:
        raise invalid(f"the request is not a sllm.v1.ClientMessage ({e})") from None


class _Stream:
    """One Converse RPC: its session, the step in flight, and how it ends."""

    def __init__(self, service: "SentenceLMService", context: grpc.ServicerContext):
        self.svc = service
        self.context = context
        self.session: Session | None = None
        self.reply_dtype = pb.DTYPE_FLOAT32
        self.kept = False
        self.ended = False
        self.job: Job | None = None
        self.lock = threading.Lock()

    # called by grpc when the RPC terminates, for any reason
    def on_done(self) -> None:
        with self.lock:
            self.ended = True
            job = self.job
        if job is not None:
            job.cancelled = True
            job.done.set()
        if self.session is not None and not self.kept:
            self.svc.store.free(self.session, "its stream ended (cancelled, deadline exceeded or disconnected)")

    def end_stream(self, code: grpc.StatusCode, details: str) -> None:
        end_stream_with_status(self.context, code, details)

    def handle(self, msg: pb.ClientMessage) -> tuple[pb.ServerMessage, bool]:
        kind = msg.WhichOneof("kind")
        if kind is None:
            raise invalid("empty ClientMessage: set one of open, append, close")
        if kind == "open":
            if self.session is not None:
                raise precondition(f"this stream already opened session {self.session.id}; one Open per stream")
            return pb.ServerMessage(opened=self.open(msg.open)), False
        if self.session is None:
            raise precondition(f"the first message of a stream must be Open, got {kind}")
        if kind == "append":
            if not msg.append.HasField("vectors"):
                raise invalid("append.vectors is missing")
            vectors = self._vectors(msg.append.vectors, "append.vectors")
            return pb.ServerMessage(step=self.step(vectors)), False
        keep = msg.close.keep
        if keep:
            self.kept = True
            self.svc.store.detach(self.session)
        else:
            self.svc.store.free(self.session, "closed by the client")
        return pb.ServerMessage(closed=pb.Closed(session_id=self.session.id, kept=keep)), True

    def end_of_input(self) -> pb.ServerMessage:
        if self.session is None:
            raise invalid("empty stream: the client ended the stream before sending Open")
        self.svc.store.free(self.session, "the client ended its stream without Close{keep: true}")
        return pb.ServerMessage(closed=pb.Closed(session_id=self.session.id, kept=False))

    def _vectors(self, msg: pb.Vectors, what: str) -> np.ndarray:
        try:
            return unpack(msg, dim=self.svc.engine.d, max_abs=self.svc.config.max_abs, what=what)
        except WireError as e:
            raise invalid(str(e)) from None

    def open(self, o: pb.Open) -> pb.Opened:
        svc = self.svc
        if svc.draining:
            raise unavailable("the server is shutting down; reconnect (to another replica) and rebuild the session "
                              "from its history")
        if not o.model_id:
            raise invalid("open.model_id is empty: send the model id of the edge bundle")
        if o.model_id != svc.model_id:
            raise precondition(f"model mismatch: the edge holds model {o.model_id!r}, this server serves "
                               f"{svc.model_id!r}; use the edge and cloud bundles of one export")
        if o.dim == 0:
            raise invalid("open.dim is 0: send the edge's sentence-vector size d")
        if o.dim != svc.engine.d:
            raise precondition(f"dimension mismatch: the edge's sentence vectors have d={o.dim}, this model's "
                               f"d={svc.engine.d}")
        if o.reply_dtype != pb.DTYPE_UNSPECIFIED and o.reply_dtype not in NUMPY_DTYPES:
            raise invalid(f"open.reply_dtype {o.reply_dtype} is not a supported dtype; use DTYPE_FLOAT32 or "
                          "DTYPE_FLOAT16")
        self.reply_dtype = o.reply_dtype or pb.DTYPE_FLOAT32
        history = self._vectors(o.history, "open.history") if o.HasField("history") else None
        session_id = check_session_id(o.session_id) if o.session_id else None
        with self.lock:
            if self.ended:
                raise _StreamEnded()
            self.session, resumed = svc.store.acquire(session_id, None if history is None else len(history),
                                                      self.end_stream)
        s = self.session
        opened = pb.Opened(session_id=s.id, resumed=resumed)
        if resumed:
            if s.last_hidden is not None:
                opened.last.CopyFrom(self._step_msg(s.last_hidden, s.last_stop_logits, s.length))
            log("session_resume", session=s.id, length=s.length)
        elif history is not None:
            opened.last.CopyFrom(self.step(history))
        opened.past_length = s.length
        opened.remaining_sentences = max(0, svc.store.max_sentences - s.length)
        return opened

    def step(self, vectors: np.ndarray) -> pb.Step:
        """Run `vectors` [T, d] through the model on top of the session's cache."""
        svc, s, n = self.svc, self.session, len(vectors)
        svc.store.reserve(s, n)
        job = Job(s, vectors)
        with self.lock:
            if self.ended:
                svc.store.release(s, n)
                raise _StreamEnded()
            self.job = job
        svc.batcher.submit(job)
        while not job.done.wait(POLL_S):
            if not svc.batcher.alive:
                job.finish(error=unavailable("the model thread has stopped"))
        with self.lock:
            self.job = None
            ended = self.ended
        if ended:
            raise _StreamEnded()
        if job.error is not None:
            svc.store.release(s, n)
            raise job.error
        out: StepOutput = job.output
        if not svc.store.commit(s, n, out.kv, out.hidden, out.stop_logits):
            raise _StreamEnded()  # freed meanwhile (idle eviction ended this stream)
        return self._step_msg(out.hidden, out.stop_logits, s.length)

    def _step_msg(self, hidden: np.ndarray, stop_logits: np.ndarray, length: int) -> pb.Step:
        out = StepOutput(hidden, stop_logits, None, True)
        return pb.Step(hidden=pack(hidden, self.reply_dtype), stop=out.stop,
                       stop_probability=out.stop_probability, past_length=length)


class SentenceLMService(pb_grpc.SentenceLMServicer):
    def __init__(self, engine: Engine, store: SessionStore, batcher: Batcher, metrics: Metrics,
                 config: ServerConfig, model_id: str):
        self.engine, self.store, self.batcher, self.metrics = engine, store, batcher, metrics
        self.config, self.model_id = config, model_id
        self.draining = False

    def Converse(self, request_iterator, context):  # noqa: N802
        stream = _Stream(self, context)
        if not context.add_callback(stream.on_done):
            return
        try:
            for raw in request_iterator:
                reply, finished = stream.handle(parse_client_message(raw))
                yield reply
                if finished:
                    return
            yield stream.end_of_input()
        except ServiceError as e:
            self._fail(stream, e.code, e.message)
        except (_StreamEnded, grpc.RpcError):
            return  # the RPC is over; on_done has freed the session
        except Exception:  # noqa: BLE001 - a bug must end this stream only
            log("internal_error", logging.ERROR, exc_info=True,
                session=stream.session.id if stream.session else None)
            self._fail(stream, grpc.StatusCode.INTERNAL, "internal error (logged on the server)")

    def _fail(self, stream: _Stream, code: grpc.StatusCode, message: str) -> None:
        self.metrics.error(code.name)
        sid = stream.session.id if stream.session else None
        log("stream_error", logging.WARNING, session=sid, code=code.name, message=message)
        if stream.session is not None:
            self.store.free(stream.session, f"its stream ended with {code.name}")
        stream.context.abort(code, message)

    def model_info(self) -> pb.ModelInfo:
        e, c = self.engine, self.config
        return pb.ModelInfo(
            model_id=self.model_id, dim=e.d, compute_dtype=c.dtype,
            accepted_dtypes=sorted(NUMPY_DTYPES), num_layers=e.num_layers, max_sentences=self.store.max_sentences,
            max_sessions=c.max_sessions, max_message_bytes=c.max_message_bytes, idle_timeout_s=c.idle_timeout_s,
            kv_budget_bytes=c.kv_budget_bytes, kv_bytes_per_sentence=e.kv_bytes_per_sentence,
            device=str(e.device), batching=c.batching, max_batch=self.batcher.max_batch)

    def GetModelInfo(self, request, context):  # noqa: N802
        return self.model_info()

    def stats(self) -> dict:
        return {**self.store.stats(), "queue_depth": self.batcher.queue_depth(), **self.metrics.snapshot()}

    def GetStats(self, request, context):  # noqa: N802
        return pb.Stats(**self.stats())


def add_service(service: SentenceLMService, server: grpc.Server) -> None:
    """Like the generated add_SentenceLMServicer_to_server, but Converse reads raw bytes."""
    handlers = {
        "Converse": grpc.stream_stream_rpc_method_handler(
            service.Converse, request_deserializer=None, response_serializer=pb.ServerMessage.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            service.GetModelInfo, request_deserializer=pb.GetModelInfoRequest.FromString,
            response_serializer=pb.ModelInfo.SerializeToString),
        "GetStats": grpc.unary_unary_rpc_method_handler(
            service.GetStats, request_deserializer=pb.GetStatsRequest.FromString,
            response_serializer=pb.Stats.SerializeToString),
    }
    name = pb.DESCRIPTOR.services_by_name["SentenceLM"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)

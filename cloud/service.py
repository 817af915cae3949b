"""The SentenceLM servicer: Converse (one conversation per stream), GetModelInfo, GetStats.

The handlers are coroutines on the server's event loop (grpc.aio): an open stream holds no
thread, so streams waiting for their first message, idle conversations, health checks and unary
calls never compete for a thread pool. The model runs in the batcher thread; a stream awaits
its step. A stream is ended only by its own handler (`context.abort` with a status), which
waits for the next message and for an end request at once: the open deadline, the eviction of
the oldest stream still waiting to open, and the idle reaper (from its thread) use that.

Speculation (issue 17): a stream whose Open asked for it (and got it: the server holds a SentenceVAE)
also gets speculative steps the batcher computes while the handler waits for the next message; a
writer task sends them (one lock orders every write on the stream: an answer is never interleaved).
A speculative step whose epoch is no longer the session's (an Append came in between) is dropped here;
the edge drops any that cross on the wire.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from sllm.cloud.auth import owner_of
from sllm.cloud.batcher import Batcher, Job, dead_error, shutting_down
from sllm.cloud.config import ServerConfig
from sllm.cloud.engine import Engine, StepOutput
from sllm.cloud.errors import ServiceError, abort, invalid
from sllm.cloud.jsonlog import LogRateLimit, log
from sllm.cloud.metrics import Metrics
from sllm.cloud.sessions import Session, SessionStore, check_session_id, owner_tag
from sllm.protos.errors import reason_name
from sllm.protos.v1 import sllm_pb2 as pb
from sllm.protos.v1 import sllm_pb2_grpc as pb_grpc
from sllm.protos.wire import NUMPY_DTYPES, WireError, pack, unpack
from sllm.sentences.sampling import AnswerOptions, StopCalibration

POLL_S = 1.0  # how often a waiting stream checks that the model thread is alive
STREAM_ERROR_LOG_INTERVAL_S = 1.0  # at most one `stream_error` line per status code this often
_STATS_FIELDS = frozenset(pb.Stats.DESCRIPTOR.fields_by_name)


def parse_client_message(raw: bytes) -> pb.ClientMessage:
    """Converse takes raw bytes (no grpc deserializer) so that garbage is INVALID_ARGUMENT, not INTERNAL."""
    try:
        return pb.ClientMessage.FromString(raw)
    except DecodeError as e:
        raise invalid(f"the request is not a sllm.v1.ClientMessage ({e})") from None


def parse_decoding(msg: pb.Decoding) -> tuple[bool, AnswerOptions]:
    """The wire's Decoding (the one place the cloud reads it): may the cloud guess this turn, and how the
    edge decodes its answer (greedy: the cloud guesses greedily) and where it ends it. Checked before
    anything of the session changes (INVALID_ARGUMENT otherwise). A penalty of 0 is unset: off, like 1."""
    try:
        return msg.guess, AnswerOptions(
            repetition_penalty=msg.repetition_penalty or 1.0, no_repeat_ngram_size=msg.no_repeat_ngram_size,
            no_repeat_sentence=msg.no_repeat_sentence, max_tokens=msg.max_tokens,
            stop_threshold=msg.stop_threshold if msg.HasField("stop_threshold") else None,
            min_sentences=msg.min_sentences, max_sentences=msg.max_sentences,
            stop_calibration=StopCalibration(msg.stop_scale, tuple(msg.stop_offsets), msg.stop_threshold
                                             if msg.HasField("stop_threshold") else None) if msg.stop_offsets else None)
    except ValueError as e:
        raise invalid(f"append.decoding: {e}") from None


class _Stream:
    """One Converse RPC: its owner, its session, the step in flight, and how it is asked to end."""

    def __init__(self, service: "SentenceLMService", context: grpc.aio.ServicerContext, owner: str):
        self.svc = service
        self.context = context
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        self.end_request: asyncio.Future = self.loop.create_future()  # a ServiceError: end this stream with it
        self.session: Session | None = None
        self.reply_dtype = pb.DTYPE_FLOAT32
        self.kept = False
        self.keep_on_disconnect = False  # Open.keep_on_disconnect
        self.cut = False  # the RPC was cancelled (the client went away), not ended by a status or a Close
        self.job: Job | None = None
        self.write_lock = asyncio.Lock()  # the handler's replies and the speculative steps share the stream
        self.speculative: asyncio.Queue | None = None  # speculative steps to send (Open.speculate granted)
        self.writer: asyncio.Task | None = None

    async def write(self, msg: pb.ServerMessage) -> None:
        """Send `msg`, or end the stream (ServiceError) when asked to end or when the client has not taken
        it within the write timeout: a client that never reads must not hold its RPC once its session is
        gone (the reaper's end request) nor for ever (a flow-control window it never opens)."""
        async with self.write_lock:
            write = asyncio.ensure_future(self.context.write(msg))
            try:
                done, _ = await asyncio.wait((write, self.end_request), timeout=self.svc.config.write_timeout_s,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not write.done():
                    write.cancel()
            if write in done:
                return write.result()
            if self.end_request.done():
                raise self.end_request.result()
            raise ServiceError(pb.SESSION_IDLE, f"the client did not read its replies for "
                                                f"{self.svc.config.write_timeout_s:g} s; the stream is ended")

    # -- speculation -------------------------------------------------------------------------
    def start_speculating(self, n: int) -> None:
        s = self.session
        self.speculative = asyncio.Queue()
        self.writer = self.loop.create_task(self._write_speculative())
        with self.svc.store.lock:
            s.speculate, s.on_speculative = n, self._speculative_sink

    def _speculative_sink(self, epoch: int, past_length: int, out: StepOutput | None, assumed) -> None:
        """From the batcher's thread (or this loop's): one speculative step for this stream (out None: declined)."""
        try:
            self.loop.call_soon_threadsafe(self.speculative.put_nowait, (epoch, past_length, out, assumed))
        except RuntimeError:  # the loop is closed: the stream is gone
            pass

    async def _write_speculative(self) -> None:
        while True:
            epoch, past_length, out, assumed = await self.speculative.get()
            s = self.session
            if s is None or s.freed or epoch != s.epoch or not s.speculate:
                continue  # an Append came in between: stale
            step = pb.Step(speculative=True, epoch=epoch, past_length=past_length)
            if out is None:
                step.declined = True
            else:
                step.MergeFrom(self._step_msg(out.hidden, out.stop_logits, past_length))
                step.assumed.CopyFrom(pack(assumed, self.reply_dtype))
            try:
                await self.write(pb.ServerMessage(step=step))
            except ServiceError as e:  # not read within the write timeout (or asked to end): the handler ends it
                self.end(e)
                return
            except Exception:  # noqa: BLE001 - the RPC ended: the handler sees it and cleans up
                return

    def after_reply(self) -> None:
        """A reply went out: the session may run ahead again."""
        if self.session is not None and self.speculative is not None:
            self.svc.batcher.speculate(self.session)

    # -- ending ------------------------------------------------------------------------------
    def end(self, error: ServiceError) -> None:
        """Ask this stream's handler to end it with `error`'s status (event-loop thread)."""
        if not self.end_request.done():
            self.end_request.set_result(error)

    def end_threadsafe(self, error: ServiceError) -> None:
        """`end` from any thread (the idle reaper): Session.end_stream."""
        try:
            self.loop.call_soon_threadsafe(self.end, error)
        except RuntimeError:  # the loop is closed: the server, and this stream, are gone
            pass

    def finish(self) -> None:
        """The handler is leaving, for any reason: nothing of this stream may live on but a kept session
        (Close{keep: true}, or a cut stream that opened with keep_on_disconnect)."""
        if self.job is not None:
            self.job.cancelled = True
        if self.writer is not None:
            self.writer.cancel()
        if self.session is not None:
            self.svc.store.stop_speculating(self.session)
        if self.session is None or self.kept:
            return
        if self.cut and self._keeps_when_cut():
            self.svc.store.detach(self.session, "its stream was cut (keep_on_disconnect)")
        else:
            self.svc.store.free(self.session, "its stream ended (cancelled, deadline exceeded or disconnected)")

    async def next_message(self, timeout: float | None = None):
        """The next request (bytes) or grpc.aio.EOF; ServiceError when asked to end or past `timeout`."""
        read = asyncio.ensure_future(self.context.read())
        try:
            done, _ = await asyncio.wait((read, self.end_request), timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not read.done():
                read.cancel()
        if read in done:
            return read.result()
        if self.end_request.done():
            raise self.end_request.result()
        raise ServiceError(pb.OPEN_TIMEOUT, f"no Open within {timeout:g} s of the stream's start; send Open first")

    # -- messages ----------------------------------------------------------------------------
    async def handle(self, msg: pb.ClientMessage) -> tuple[pb.ServerMessage | None, bool]:
        kind = msg.WhichOneof("kind")
        if kind is None:
            raise invalid("empty ClientMessage: set one of open, append, accept, close")
        if kind == "open":
            if self.session is not None:
                raise ServiceError(pb.OUT_OF_ORDER, "this stream already opened a session; one Open per stream")
            return pb.ServerMessage(opened=await self.open(msg.open)), False
        if self.session is None:
            raise ServiceError(pb.OUT_OF_ORDER, f"the first message of a stream must be Open, got {kind}")
        if kind == "append":
            if not msg.append.HasField("vectors"):
                raise invalid("append.vectors is missing")
            vectors = self._vectors(msg.append.vectors, "append.vectors")
            self.session.spec_dtype = np.float16 if msg.append.vectors.dtype == pb.DTYPE_FLOAT16 else np.float32
            position = msg.append.position if msg.append.HasField("position") else None
            decoding = parse_decoding(msg.append.decoding) if msg.append.HasField("decoding") else None
            return pb.ServerMessage(step=await self.step(vectors, position, decoding)), False
        if kind == "accept":
            if self.speculative is None:
                raise ServiceError(pb.OUT_OF_ORDER, "accept without speculation: this stream's Open did not get "
                                                    "speculate > 0")
            self.svc.store.accept(self.session, msg.accept.position)
            self.svc.batcher.speculate(self.session)
            return None, False
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
        if self._keeps_when_cut():  # a proxy in between may end the stream so when its client goes away
            self.kept = True
            self.svc.store.detach(self.session, "its stream ended without Close (keep_on_disconnect)")
        else:
            self.svc.store.free(self.session, "the client ended its stream without Close{keep: true}")
        return pb.ServerMessage(closed=pb.Closed(session_id=self.session.id, kept=self.kept))

    def _keeps_when_cut(self) -> bool:
        return self.keep_on_disconnect and not self.svc.draining and not self.session.freed

    def _vectors(self, msg: pb.Vectors, what: str) -> np.ndarray:
        try:
            return unpack(msg, dim=self.svc.engine.d, max_abs=self.svc.config.max_abs, what=what)
        except WireError as e:
            raise invalid(str(e)) from None

    async def open(self, o: pb.Open) -> pb.Opened:
        svc = self.svc
        if svc.draining:
            raise shutting_down("the server is shutting down; reconnect (to another replica) and rebuild the session "
                                "from its history")
        if not svc.batcher.alive:
            raise dead_error()
        if not o.model_id:
            raise invalid("open.model_id is empty: send the model id of the edge bundle")
        if o.model_id != svc.model_id:
            raise ServiceError(pb.MODEL_MISMATCH, f"model mismatch: the edge holds model {o.model_id!r}, this server "
                                                  f"serves {svc.model_id!r}; use the edge and cloud bundles of one "
                                                  "export")
        if o.dim == 0:
            raise invalid("open.dim is 0: send the edge's sentence-vector size d")
        if o.dim != svc.engine.d:
            raise ServiceError(pb.MODEL_MISMATCH, f"dimension mismatch: the edge's sentence vectors have d={o.dim}, "
                                                  f"this model's d={svc.engine.d}")
        if o.reply_dtype != pb.DTYPE_UNSPECIFIED and o.reply_dtype not in NUMPY_DTYPES:
            raise invalid(f"open.reply_dtype {o.reply_dtype} is not a supported dtype; use DTYPE_FLOAT32 or "
                          "DTYPE_FLOAT16")
        self.reply_dtype = o.reply_dtype or pb.DTYPE_FLOAT32
        self.keep_on_disconnect = o.keep_on_disconnect
        history = self._vectors(o.history, "open.history") if o.HasField("history") else None
        session_id = check_session_id(o.session_id) if o.session_id else None
        self.session, resumed = svc.store.acquire(self.owner, session_id,
                                                  None if history is None else len(history), self.end_threadsafe)
        s = self.session
        opened = pb.Opened(session_id=s.id, resumed=resumed)
        if resumed:
            if s.last_hidden is not None:
                opened.last.CopyFrom(self._step_msg(s.last_hidden, s.last_stop_logits, s.length))
            log("session_resume", session=s.tag, length=s.length)
        elif history is not None:
            opened.last.CopyFrom(await self.step(history))
        opened.past_length = s.length
        opened.remaining_sentences = max(0, svc.store.max_sentences - s.length)
        if o.speculate:
            granted, note = svc.grant_speculation(o.speculate)
            opened.speculate, opened.speculate_note = granted, note
            if granted:
                self.start_speculating(granted)
        return opened

    async def step(self, vectors: np.ndarray, position: int | None = None,
                   decoding: tuple[bool, AnswerOptions] | None = None) -> pb.Step:
        """Run `vectors` [T, d] through the model on top of the session's cache, at `position` (None: after
        its confirmed sentences); what the session held from there on (speculation) is dropped first.
        `decoding`: a new turn's, parse_decoding's (its answer starts after these vectors; guesses decode like
        the edge)."""
        svc, s, n = self.svc, self.session, len(vectors)
        with svc.store.lock:  # one step: the batcher never speculates in between (it sees the reservation)
            if position is not None or s.length > s.confirmed or s.speculate:
                svc.store.truncate(s, s.confirmed if position is None else position)
            svc.store.reserve(s, n)
            start = s.length
            if decoding is not None:
                s.guess, s.decoding = decoding
                s.answer_start, s.answer_tokens = start + n, {}
        done = self.loop.create_future()
        loop = self.loop

        def resolve() -> None:  # the batcher's thread (or this one, when submit refuses)
            try:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        job = self.job = Job(s, vectors, on_done=resolve, start=start)
        try:
            svc.batcher.submit(job)
            while not done.done():
                await asyncio.wait((done,), timeout=POLL_S)
                if not done.done() and not svc.batcher.alive:
                    job.finish(error=dead_error())
        except asyncio.CancelledError:  # the client went away: the step never happened (finish() frees or
            svc.store.release(s, n)  # keeps the session as it was before it)
            raise
        finally:  # the batcher skips a cancelled job (and its output is dropped if it ran)
            self.job = None
            if not job.done.is_set():
                job.cancelled = True
        if job.error is not None:
            svc.store.release(s, n)
            raise job.error
        out: StepOutput = job.output
        if not svc.store.commit(s, n, out.hidden, out.stop_logits):
            raise shutting_down("this session was freed while its step ran (the server is shutting down)")
        return self._step_msg(out.hidden, out.stop_logits, s.length, s.epoch)

    def _step_msg(self, hidden: np.ndarray, stop_logits: np.ndarray, length: int, epoch: int = 0) -> pb.Step:
        out = StepOutput(hidden, stop_logits, True)
        return pb.Step(hidden=pack(hidden, self.reply_dtype), stop=out.stop,
                       stop_probability=out.stop_probability, past_length=length, epoch=epoch)


class PendingStreams:
    """Converse streams that have not sent their Open yet, oldest first (event-loop thread only).
    At most `limit`: a new stream ends the oldest one of the owner (token) with the most streams
    waiting (RESOURCE_EXHAUSTED), so streams that never send anything keep out neither a new
    conversation nor, when they come from one token, another token's streams. Each also has its
    own deadline (ServerConfig.open_timeout_s)."""

    def __init__(self, limit: int, owner_limit: int = 0):
        self.limit = limit
        self.owner_limit = owner_limit or limit  # one owner's quota of waiting streams
        self.streams: OrderedDict[_Stream, None] = OrderedDict()
        self.by_owner: Counter[str] = Counter()
        self.evicted_total = 0

    def enter(self, stream: _Stream) -> None:
        while len(self.streams) >= self.limit or self.by_owner[stream.owner] >= self.owner_limit:
            greediest = (stream.owner if self.by_owner[stream.owner] >= self.owner_limit
                         else max(self.by_owner, key=self.by_owner.__getitem__))
            oldest = next(s for s in self.streams if s.owner == greediest)
            self.leave(oldest)
            self.evicted_total += 1
            oldest.end(ServiceError(pb.SERVER_FULL, f"more than {self.limit} streams in all, or {self.owner_limit} of "
                                                    "this token's, were waiting to send their Open; this one, the "
                                                    "oldest of its token's, was ended: send Open as soon as the "
                                                    "stream starts"))
        self.streams[stream] = None
        self.by_owner[stream.owner] += 1

    def leave(self, stream: _Stream) -> None:
        if self.streams.pop(stream, False) is None:
            self.by_owner[stream.owner] -= 1
            if not self.by_owner[stream.owner]:
                del self.by_owner[stream.owner]


class SentenceLMService(pb_grpc.SentenceLMServicer):
    def __init__(self, engine: Engine, store: SessionStore, batcher: Batcher, metrics: Metrics,
                 config: ServerConfig, model_id: str, *, max_message_bytes: int = 0, weights_sha256: str = ""):
        self.engine, self.store, self.batcher, self.metrics = engine, store, batcher, metrics
        self.config, self.model_id = config, model_id
        self.max_message_bytes = max_message_bytes or config.max_message_bytes
        self.weights_sha256 = weights_sha256
        self.draining = False
        self.pending = PendingStreams(config.max_pending_streams, config.quota(config.max_pending_streams))
        self.streams_open = 0  # Converse handlers running (each ends its RPC; a client that never reads included)
        self.health = None  # cloud.health.BoundedHealth, once the server has one (its watches are in the stats)
        # speculation: the most sentences a stream may run ahead; 0 without a SentenceVAE
        self.speculate_max = config.speculate_max if batcher.codec is not None else 0
        self._error_logs: dict[str, LogRateLimit] = {}

    async def Converse(self, request_iterator, context):  # noqa: N802
        c = self.config
        stream = _Stream(self, context, owner_of(context, tokens=bool(c.tokens), client_certs=bool(c.tls_client_ca)))
        self.pending.enter(stream)
        self.streams_open += 1
        try:
            raw = await stream.next_message(c.open_timeout_s)
            self.pending.leave(stream)
            if stream.end_request.done():  # ended for waiting in the same instant its first message came: it
                stream.end_request = stream.loop.create_future()  # did send it, so it goes on
            while raw is not grpc.aio.EOF:
                reply, finished = await stream.handle(parse_client_message(raw))
                if reply is not None:
                    await stream.write(reply)
                    stream.after_reply()
                if finished:
                    return
                raw = await stream.next_message()
            await stream.write(stream.end_of_input())
        except ServiceError as e:
            await self._fail(stream, e)
        except asyncio.CancelledError:
            stream.cut = True
            raise  # the RPC was cancelled (client, deadline, shutdown): `finish` cleans up
        except Exception:  # noqa: BLE001 - a bug must end this stream only
            if context.done():
                return  # the RPC is over already (a read or write raced its end): nothing to report
            log("internal_error", logging.ERROR, exc_info=True,
                session=stream.session.tag if stream.session else None)
            await self._fail(stream, ServiceError(pb.SERVER_BUG, "internal error (logged on the server)"))
        finally:
            self.streams_open -= 1
            self.pending.leave(stream)
            stream.finish()

    async def _fail(self, stream: _Stream, error: ServiceError) -> None:
        code = error.code.name
        self.metrics.error(code)
        limit = self._error_logs.setdefault(code, LogRateLimit(STREAM_ERROR_LOG_INTERVAL_S))
        suppressed = limit.take()
        if suppressed is not None:
            log("stream_error", logging.WARNING, session=stream.session.tag if stream.session else None,
                code=code, reason=reason_name(error.reason), message=error.message, suppressed=suppressed)
        if stream.session is not None:
            self.store.free(stream.session, f"its stream ended with {code}")
        await abort(stream.context, error)

    def grant_speculation(self, asked: int) -> tuple[int, str]:
        """(sentences granted, why not what was asked) for Open.speculate = `asked`."""
        if self.batcher.codec is None:
            return 0, ("this server has no SentenceVAE graphs to speculate with (no edge/ beside its cloud bundle; "
                       "sllm-cloud serve --edge-bundle DIR): speculation is off")
        if not self.speculate_max:
            return 0, "speculation is off on this server (--speculate-max 0)"
        if asked > self.speculate_max:
            return self.speculate_max, f"capped at this server's --speculate-max {self.speculate_max}"
        return asked, ""

    def model_info(self) -> pb.ModelInfo:
        e, c = self.engine, self.config
        return pb.ModelInfo(
            model_id=self.model_id, dim=e.d, compute_dtype=c.dtype,
            accepted_dtypes=sorted(NUMPY_DTYPES), num_layers=e.num_layers, max_sentences=self.store.max_sentences,
            max_sessions=c.max_sessions, max_message_bytes=self.max_message_bytes, idle_timeout_s=c.idle_timeout_s,
            kv_budget_bytes=c.kv_budget_bytes, kv_bytes_per_sentence=e.kv_bytes_per_sentence,
            device=str(e.device), batching=self.batcher.max_batch > 1, max_batch=self.batcher.max_batch,
            weights_sha256=self.weights_sha256)

    async def GetModelInfo(self, request, context):  # noqa: N802
        if not self.batcher.alive and not self.draining:
            self.metrics.error(grpc.StatusCode.UNAVAILABLE.name)
            await abort(context, dead_error())
        return self.model_info()

    def stats(self) -> dict:
        return {**self.store.stats(), "queue_depth": self.batcher.queue_depth(), **self.metrics.snapshot(),
                **self.store.speculation_stats(), "speculate_max": self.speculate_max,
                "pending_streams": len(self.pending.streams), "streams_open": self.streams_open,
                "pending_streams_evicted_total": self.pending.evicted_total,
                "by_owner": self.store.owner_stats(owner_tag),
                "health_watches": len(self.health.watches) if self.health else 0,
                "health_watches_ended_total": self.health.ended_total if self.health else 0}

    async def GetStats(self, request, context):  # noqa: N802
        return pb.Stats(**{k: v for k, v in self.stats().items() if k in _STATS_FIELDS})


def add_service(service: SentenceLMService, server: grpc.aio.Server) -> None:
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

"""The gRPC server around the service: limits, health, reflection, auth, TLS (and mutual TLS),
metrics, idle reaping and graceful shutdown.

The gRPC side is grpc.aio on an event loop of its own thread (`CloudServer.start()` / `stop()`
stay plain blocking calls): streams hold no threads, so no number of open or idle streams can
take the threads that health checks and unary calls need."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sllm.cloud.auth import BearerAuthInterceptor
from sllm.cloud.batcher import Batcher, shutting_down
from sllm.cloud.config import DEFAULT_MAX_MESSAGE_BYTES, MIB, ServerConfig, is_loopback
from sllm.cloud.engine import Engine, pick_device
from sllm.cloud.guesses import GuessCodec, edge_folder_of
from sllm.cloud.health import BoundedHealth
from sllm.cloud.jsonlog import log
from sllm.cloud.limits import connection_limit, return_freed_memory
from sllm.cloud.metrics import Metrics, MetricsHTTPServer
from sllm.cloud.service import SentenceLMService, add_service
from sllm.cloud.sessions import SessionStore
from sllm.modeling.cloud_bundle import load_cloud_bundle
from sllm.modeling.opt_graft import GraftedOPT
from sllm.protos.v1 import sllm_pb2 as pb
from sllm.runtime.manifest import cloud_weights_sha256

_DRAIN_POLL_S = 0.02  # how often stop() checks whether the open streams have ended
# draining: a conversation whose stream has had no step for ServerConfig.hand_back_idle_s is between
# turns (an edge decodes a sentence in well under a second): its stream is ended (UNAVAILABLE) so that
# its client rebuilds the session elsewhere on its next turn, instead of holding the drain for the grace
HAND_BACK_MESSAGE = ("this replica is shutting down; reconnect (to another replica) and rebuild the session "
                     "from its history")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SentenceLM"].full_name  # "sllm.v1.SentenceLM"
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"


def full_history_bytes(model_id: str, d: int, max_sentences: int) -> int:
    """Bytes of the largest valid request: Open{history} of `max_sentences` float32 vectors of size
    `d`, with the longest session id and every flag set (what a client sends to rebuild a full session)."""
    history = pb.Vectors(data=bytes(max_sentences * d * 4), dtype=pb.DTYPE_FLOAT32, dim=d, count=max_sentences)
    return pb.ClientMessage(open=pb.Open(model_id=model_id, dim=d, session_id="x" * 128, history=history,
                                         reply_dtype=pb.DTYPE_FLOAT16, keep_on_disconnect=True)).ByteSize()


def message_limit(config: ServerConfig, model_id: str, d: int, max_sentences: int) -> int:
    """The message-size limit: `config.max_message_bytes`, or when 0 the larger of 4 MiB and what a
    full-history rebuild needs. An explicit limit too small for that rebuild is a ValueError that
    names both settings (a server that cannot take back its own sessions must not start)."""
    need = full_history_bytes(model_id, d, max_sentences)
    if not config.max_message_bytes:
        return max(DEFAULT_MAX_MESSAGE_BYTES, need)
    if config.max_message_bytes < need:
        sentences = (f"--max-sentences {max_sentences}" if config.max_sentences
                     else f"--max-sentences 0 (the model's maximum, {max_sentences})")
        raise ValueError(
            f"--max-message-mb {config.max_message_bytes / MIB:g} ({config.max_message_bytes} bytes) is too small for "
            f"{sentences}: a client rebuilding a full session sends Open{{history}} of {max_sentences} float32 "
            f"vectors of d={d}, {need} bytes. Raise --max-message-mb to at least {need / MIB:.3f}, lower "
            "--max-sentences, or leave --max-message-mb at 0 (automatic)")
    return config.max_message_bytes


class _LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro) -> None:
        try:
            asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # closed
            coro.close()

    def close(self) -> None:
        async def _cancel_rest():
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        try:
            self.run(_cancel_rest(), timeout=5)
        except Exception:  # noqa: BLE001 - best effort: the loop goes anyway
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


class CloudServer:
    """Build with `CloudServer.from_bundle(dir, config)` (or a model in tests), then start() / stop().

    `weights_sha256` is what ModelInfo reports: from_bundle passes the manifest's hash of
    cloud.safetensors (verified as the bundle loads); a server built from an in-memory model
    reports "" unless given one."""

    def __init__(self, model: GraftedOPT, model_id: str, config: ServerConfig, weights_sha256: str = "",
                 guesses: GuessCodec | None = None):
        """guesses: the model's edge graphs, for sentence-level speculation (None: none offered)."""
        config.validate()
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        device = pick_device(config.device)
        if config.dtype != "float32" and device.type == "cpu":
            raise ValueError(f"--dtype {config.dtype} needs a GPU; this server runs on the CPU")
        self.engine = Engine(model, device, config.dtype, config.backend)
        max_sentences = self.engine.max_positions
        if config.max_sentences:
            max_sentences = min(config.max_sentences, max_sentences)
        self.max_message_bytes = message_limit(config, model_id, self.engine.d, max_sentences)
        self.metrics = Metrics()
        self.store = SessionStore(max_sessions=config.max_sessions, max_sentences=max_sentences,
                                  idle_timeout_s=config.idle_timeout_s, kv_budget_bytes=config.kv_budget_bytes,
                                  kv_bytes_per_sentence=self.engine.kv_bytes_per_sentence, metrics=self.metrics,
                                  new_slot=self.engine.new_slot,
                                  owner_max_sessions=config.quota(config.max_sessions),
                                  owner_kv_budget_bytes=config.quota(config.kv_budget_bytes),
                                  answer_guess_max=config.speculate_answer_max)
        if guesses is not None and guesses.d != self.engine.d:
            raise ValueError(f"the edge graphs' d={guesses.d} differs from the cloud model's d={self.engine.d}")
        codec = guesses if config.speculate_max else None
        self.batcher = Batcher(self.engine, self.metrics, max_batch=config.max_batch,
                               batch_wait_ms=config.batch_wait_ms, log_steps=config.log_steps,
                               on_death=self._model_died, store=self.store, codec=codec)
        self.service = SentenceLMService(self.engine, self.store, self.batcher, self.metrics, config, model_id,
                                         max_message_bytes=self.max_message_bytes, weights_sha256=weights_sha256)
        self.model_id = model_id
        self.weights_sha256 = weights_sha256
        self.port: int | None = None
        self.metrics_http: MetricsHTTPServer | None = None
        self.grpc_server: grpc.aio.Server | None = None
        self.health: BoundedHealth | None = None
        self.max_connections = connection_limit(config.max_connections)
        self._loop: _LoopThread | None = None
        self._reaper_stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="sllm-reaper", daemon=True)
        self._not_serving = threading.Event()  # health says NOT_SERVING (dead model or shutdown)
        self._force = threading.Event()  # stop now: skip what is left of the grace period
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, config: ServerConfig) -> "CloudServer":
        model, manifest = load_cloud_bundle(Path(bundle_dir), "cpu")
        guesses = None
        if config.speculate_max:  # the edge's graphs: --edge-bundle DIR, else the edge/ of the bundle's export folder
            folder = Path(config.edge_dir) if config.edge_dir else edge_folder_of(Path(bundle_dir))
            if folder is not None:  # one ORT thread: no pool spinning beside the engine's torch threads
                guesses = GuessCodec.load(folder, manifest["model_id"], int(manifest["d_model"]),
                                          cloud_weights_sha256(manifest), threads=1)
        return cls(model, manifest["model_id"], config, weights_sha256=cloud_weights_sha256(manifest), guesses=guesses)

    # -- start -------------------------------------------------------------------------------
    async def _start_grpc(self) -> None:
        c = self.config
        interceptors = []
        if c.tokens:
            interceptors.append(BearerAuthInterceptor(c.tokens,
                                                      on_reject=lambda: self.metrics.error("UNAUTHENTICATED")))
        server = grpc.aio.server(interceptors=interceptors, options=self.grpc_options())
        add_service(self.service, server)
        health = BoundedHealth(max_watches=c.health_watch_max, per_peer=c.health_watch_per_peer,
                               lifetime_s=c.health_watch_lifetime_s)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        self.service.health = health
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{c.host}:{c.port}"
        try:
            if c.tls:
                client_ca = Path(c.tls_client_ca).read_bytes() if c.tls_client_ca else None
                creds = grpc.ssl_server_credentials([(Path(c.tls_key).read_bytes(), Path(c.tls_cert).read_bytes())],
                                                    root_certificates=client_ca,
                                                    require_client_auth=client_ca is not None)
                port = server.add_secure_port(address, creds)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {address} ({e})") from None
        if not port:
            raise OSError(f"cannot listen on {address}")
        await server.start()
        self.grpc_server = server
        for name in ("", SERVICE_NAME):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.port, self.health = port, health  # from here on, _model_died may flip it

    def grpc_options(self) -> list[tuple[str, int]]:
        """grpc-core's own limits. No limit on concurrent RPCs in all: grpc counts a call until its
        connection lets it close, so calls of clients that never read (ended by the service at once) would
        hold it and lock everyone out. Streams are bounded per connection, connections in all, and each
        kind of RPC by the service itself (pending streams, sessions, health watches)."""
        c, ms = self.config, lambda seconds: int(seconds * 1000)
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", 60_000),  # find dead peers: their streams end, their sessions are freed
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_concurrent_streams", c.max_streams_per_connection or c.max_sessions + c.max_pending_streams),
            ("grpc.max_allowed_incoming_connections", self.max_connections),
            ("grpc.max_connection_idle_ms", ms(c.connection_idle_s)),
            ("grpc.max_connection_age_ms", ms(c.connection_age_s)),
            ("grpc.max_connection_age_grace_ms", ms(c.connection_grace_s)),
            ("grpc.server_handshake_timeout_ms", ms(c.handshake_timeout_s)),
        ]

    def start(self) -> "CloudServer":
        c = self.config
        return_freed_memory()
        self.batcher.start()
        self._reaper.start()
        self._loop = _LoopThread("sllm-grpc")
        try:
            self._loop.run(self._start_grpc(), timeout=60)
            if c.metrics_port >= 0:
                self.metrics_http = MetricsHTTPServer(c.metrics_host, c.metrics_port, self.service.stats)
        except BaseException:
            self._shutdown_parts(forced=True)
            self._stopped.set()
            raise
        address = f"{c.host}:{self.port}"
        metrics_address = f"{c.metrics_host}:{self.metrics_http.port}" if self.metrics_http else None
        log("server_start", address=address, tls=c.tls, mutual_tls=bool(c.tls_client_ca), auth=bool(c.tokens),
            model_id=self.model_id, weights_sha256=self.weights_sha256, d=self.engine.d,
            layers=self.engine.num_layers, device=str(self.engine.device), dtype=c.dtype, batching=self.batcher.max_batch > 1,
            max_batch=self.batcher.max_batch, max_sessions=c.max_sessions, max_sentences=self.store.max_sentences,
            kv_budget_bytes=c.kv_budget_bytes, idle_timeout_s=c.idle_timeout_s,
            max_message_bytes=self.max_message_bytes, open_timeout_s=c.open_timeout_s,
            max_pending_streams=c.max_pending_streams, metrics_address=metrics_address,
            metrics_port=self.metrics_http.port if self.metrics_http else None,
            speculate_max=self.service.speculate_max, owner_share=c.owner_share if c.authenticated else None,
            write_timeout_s=c.write_timeout_s, max_connections=self.max_connections,
            health_watch_max=c.health_watch_max)
        if c.speculate_max and not self.service.speculate_max:
            log("speculation_off", logging.WARNING, message="--speculate-max is set but this server has no edge bundle "
                "to guess with (no edge/ beside the cloud bundle; give one with --edge-bundle DIR): edges asking to "
                "speculate get 0")
        if c.exposed_insecurely:  # only with --insecure: config.validate refuses it otherwise
            log("INSECURE", logging.CRITICAL, address=address, tls=c.tls, auth=c.authenticated,
                message=f"--insecure: listening on {address} without "
                        f"{'TLS' if not c.tls else ''}{' or ' if not c.tls and not c.authenticated else ''}"
                        f"{'authentication' if not c.authenticated else ''}: anyone who can reach this address can "
                        "use the model and read or alter the vectors on the wire")
        elif not c.authenticated:
            log("no_auth", logging.WARNING, message="no bearer tokens configured: any process that can reach "
                                                    f"{address} may use the model (loopback only)")
        if self.metrics_http and not is_loopback(c.metrics_host):
            log("metrics_exposed", logging.WARNING, address=metrics_address,
                message="the Prometheus endpoint has no auth and no TLS and listens beyond loopback")
        return self

    # -- health ------------------------------------------------------------------------------
    def _model_died(self) -> None:
        """The batcher's thread died or its device failed (batcher thread, or the reaper's watchdog):
        health NOT_SERVING, and every Converse / GetModelInfo call fails with UNAVAILABLE (the service
        checks `batcher.alive`)."""
        health = self.health
        if self._not_serving.is_set() or health is None:  # already said (or shutting down); not serving yet:
            return  # the reaper's watchdog calls again once it is

        async def _flip():
            for name in ("", SERVICE_NAME):
                await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

        self._not_serving.set()
        self._loop.submit(_flip())
        log("not_serving", logging.CRITICAL, reason="the model thread has stopped")

    def _reap_loop(self) -> None:
        period = min(1.0, max(0.05, self.config.idle_timeout_s / 4))
        while not self._reaper_stop.wait(period):
            self.store.reap()
            if not self.batcher.alive and not self.service.draining:  # watchdog: however it stopped
                self._model_died()

    # -- stop --------------------------------------------------------------------------------
    def force_stop(self) -> None:
        """Cut a stop() in progress short: cancel the streams still open now instead of at the end of
        the grace period (a second SIGTERM/SIGINT)."""
        self._force.set()

    def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: report NOT_SERVING, refuse new sessions (UNAVAILABLE), let open streams
        go on for up to `grace` seconds (steps still run), then stop the transport, cancelling what is
        left. `force_stop()` (another thread) ends the wait at once."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            if self._loop is None:  # never started
                self._stopped.set()
                return
            grace = self.config.grace_s if grace is None else grace
            t0 = time.monotonic()
            stats = self.service.stats()
            log("server_draining", grace_s=grace, sessions=stats["sessions"],
                attached_sessions=stats["attached_sessions"])
            self.service.draining = True
            self._not_serving.set()
            try:
                self._loop.run(self.health.enter_graceful_shutdown(), timeout=5)
            except Exception:  # noqa: BLE001 - the transport stops anyway
                pass
            # Drain in the service first: while streams finish, new sessions are refused with a clean,
            # retryable UNAVAILABLE. Stopping the transport at once would let grpc-core refuse the RPCs
            # that race it with CANCELLED instead, which clients do not retry.
            deadline = t0 + grace
            while (self.store.stats()["attached_sessions"] and time.monotonic() < deadline
                   and not self._force.wait(_DRAIN_POLL_S)):
                if self.config.hand_back_idle_s:
                    self.store.hand_back(self.config.hand_back_idle_s, shutting_down(HAND_BACK_MESSAGE))
            forced = self._force.is_set()
            self._shutdown_parts(forced=forced, grace=0.0 if forced else max(0.0, deadline - time.monotonic()))
            log("server_stop", drained_in_s=round(time.monotonic() - t0, 3), forced=forced)
            self._stopped.set()

    def _shutdown_parts(self, forced: bool, grace: float = 0.0) -> None:
        if self.grpc_server is not None:
            try:
                self._loop.run(self.grpc_server.stop(grace), timeout=grace + 10)
            except Exception:  # noqa: BLE001 - the loop goes next, and with it every RPC
                pass
        if self._loop is not None:
            self._loop.close()
        self.batcher.stop(timeout=1.0 if forced else 10.0)
        self._reaper_stop.set()
        if self._reaper.is_alive():
            self._reaper.join(timeout=5)
        self.store.free_all("server shut down")
        if self.metrics_http:
            self.metrics_http.stop()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> "CloudServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=0)

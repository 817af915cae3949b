"""The gRPC server around the service: limits, health, reflection, auth, TLS, metrics,
idle reaping and graceful shutdown."""
from __future__ import annotations

import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloud.auth import BearerAuthInterceptor
from cloud.batcher import Batcher
from cloud.config import ServerConfig
from cloud.engine import Engine, pick_device
from cloud.jsonlog import log
from cloud.metrics import Metrics, MetricsHTTPServer
from cloud.service import SentenceLMService, add_service
from cloud.sessions import SessionStore
from modeling.cloud_bundle import load_cloud_bundle
from modeling.opt_graft import GraftedOPT
from protos.sllm.v1 import sllm_pb2 as pb

_DRAIN_POLL_S = 0.02  # how often stop() checks whether the open streams have ended
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SentenceLM"].full_name  # "sllm.v1.SentenceLM"
EXTRA_WORKERS = 16  # threads beyond max_sessions: unary calls, health, streams not yet opened


class CloudServer:
    """Build with `CloudServer.from_bundle(dir, config)` (or a model in tests), then start() / stop()."""

    def __init__(self, model: GraftedOPT, model_id: str, config: ServerConfig):
        config.validate()
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        device = pick_device(config.device)
        if config.dtype != "float32" and device.type == "cpu":
            raise ValueError(f"--dtype {config.dtype} needs a GPU; this server runs on the CPU")
        self.engine = Engine(model, device, config.dtype)
        max_sentences = self.engine.max_positions
        if config.max_sentences:
            max_sentences = min(config.max_sentences, max_sentences)
        self.metrics = Metrics()
        self.store = SessionStore(max_sessions=config.max_sessions, max_sentences=max_sentences,
                                  idle_timeout_s=config.idle_timeout_s, kv_budget_bytes=config.kv_budget_bytes,
                                  kv_bytes_per_sentence=self.engine.kv_bytes_per_sentence, metrics=self.metrics)
        self.batcher = Batcher(self.engine, self.metrics, batching=config.batching, max_batch=config.max_batch,
                               batch_wait_ms=config.batch_wait_ms, log_steps=config.log_steps)
        self.service = SentenceLMService(self.engine, self.store, self.batcher, self.metrics, config, model_id)
        self.model_id = model_id
        self.port: int | None = None
        self.metrics_http: MetricsHTTPServer | None = None
        self._reaper_stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="sllm-reaper", daemon=True)
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._build_grpc()

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, config: ServerConfig) -> "CloudServer":
        model, manifest = load_cloud_bundle(Path(bundle_dir), "cpu")
        return cls(model, manifest["model_id"], config)

    def _build_grpc(self) -> None:
        c = self.config
        workers = c.max_sessions + EXTRA_WORKERS
        interceptors = []
        if c.tokens:
            interceptors.append(BearerAuthInterceptor(c.tokens,
                                                      on_reject=lambda: self.metrics.error("UNAUTHENTICATED")))
        options = [
            ("grpc.max_receive_message_length", c.max_message_bytes),
            ("grpc.max_send_message_length", c.max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", 60_000),  # find dead peers: their streams end, their sessions are freed
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        self._executor = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sllm-rpc")
        self.grpc_server = grpc.server(self._executor, interceptors=interceptors, options=options,
                                       maximum_concurrent_rpcs=workers)
        add_service(self.service, self.grpc_server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.grpc_server)
        address = f"{c.host}:{c.port}"
        if c.tls_cert:
            creds = grpc.ssl_server_credentials([(Path(c.tls_key).read_bytes(), Path(c.tls_cert).read_bytes())])
            self.port = self.grpc_server.add_secure_port(address, creds)
        else:
            self.port = self.grpc_server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address}")

    def start(self) -> "CloudServer":
        c = self.config
        self.batcher.start()
        self._reaper.start()
        self.grpc_server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if c.metrics_port >= 0:
            self.metrics_http = MetricsHTTPServer(c.host, c.metrics_port, self.service.stats)
        log("server_start", address=f"{c.host}:{self.port}", tls=bool(c.tls_cert), auth=bool(c.tokens),
            model_id=self.model_id, d=self.engine.d, layers=self.engine.num_layers, device=str(self.engine.device),
            dtype=c.dtype, batching=c.batching, max_batch=self.batcher.max_batch, max_sessions=c.max_sessions,
            max_sentences=self.store.max_sentences, kv_budget_bytes=c.kv_budget_bytes,
            idle_timeout_s=c.idle_timeout_s, max_message_bytes=c.max_message_bytes,
            metrics_port=self.metrics_http.port if self.metrics_http else None)
        return self

    def _reap_loop(self) -> None:
        period = min(1.0, max(0.05, self.config.idle_timeout_s / 4))
        while not self._reaper_stop.wait(period):
            self.store.reap()

    def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: report NOT_SERVING, refuse new sessions (UNAVAILABLE), let open streams
        go on for up to `grace` seconds (steps still run), then stop the transport, cancelling what is left."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace = self.config.grace_s if grace is None else grace
            t0 = time.monotonic()
            stats = self.service.stats()
            log("server_draining", grace_s=grace, sessions=stats["sessions"],
                attached_sessions=stats["attached_sessions"])
            self.health.enter_graceful_shutdown()
            self.service.draining = True
            # Drain in the service first: while streams finish, new sessions are refused with a clean,
            # retryable UNAVAILABLE. Stopping the transport at once would let grpc-core refuse the RPCs
            # that race it with CANCELLED instead, which clients do not retry.
            deadline = t0 + grace
            while self.store.stats()["attached_sessions"] and time.monotonic() < deadline:
                time.sleep(_DRAIN_POLL_S)
            self.grpc_server.stop(max(0.0, deadline - time.monotonic())).wait()
            self._executor.shutdown(wait=True, cancel_futures=True)
            self.batcher.stop()
            self._reaper_stop.set()
            self._reaper.join(timeout=5)
            self.store.free_all("server shut down")
            if self.metrics_http:
                self.metrics_http.stop()
            log("server_stop", drained_in_s=round(time.monotonic() - t0, 3))
            self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> "CloudServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=0)

"""Replicas behind nginx on this machine: `sllm-cloud cluster`, a development convenience over the
shipped balancer configuration (cloud/nginx.conf, as cloud/balancer.py adapts it to loopback).

    sllm-cloud cluster --bundle models/default/cloud --replicas 2 --port 50051
    edge-chat --server 127.0.0.1:50051 --bundle models/default/edge

`Cluster` starts N `sllm-cloud serve` replicas on 127.0.0.1 (runtime.server_process: ports the OS
picks, kept across restarts) and one nginx in front of them (cloud.balancer), and stops them all.
The replicas share the bearer tokens (passed in their environment, never on a command line), so one
token's sessions are one owner's on every replica.

Routing is the shipped file's: `hash $sllm_route consistent` over the replicas, the route being the
`x-sllm-session-key` header the edge sends on every call of a conversation (a random key it picks
when the conversation starts, before its first Open, and keeps across reconnects and rebuilds);
calls without the header are spread at random. A reconnect therefore lands on the replica holding
the session while it lives; when that replica is gone nginx passes the key on to the next replica
of the ring, where the edge rebuilds the session from its history vectors.

Health: nginx (open source) has no active health checks, so a watcher per replica follows its
`grpc.health.v1.Health/Watch` and, when a replica stops SERVING (it drains on SIGTERM, its model
thread died, its process is gone), marks it `down` in the config and reloads nginx; SERVING again
puts it back. A replica that dies is also skipped at once by nginx itself (`grpc_next_upstream
error`: the connection is refused, the next replica of the ring gets the call).
"""
from __future__ import annotations

import contextlib
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sllm.cloud.balancer import NGINX_INSTALL_HINT, Balancer, BalancerError, find_nginx
from sllm.protos.client import SESSION_KEY_HEADER
from sllm.runtime.server_process import ServerError, ServerProcess, serve_command


class ClusterError(RuntimeError):
    """Something of the cluster could not start; the message says what (and the log lines)."""


@contextlib.contextmanager
def _as_cluster_error() -> Iterator[None]:
    try:
        yield
    except (ServerError, BalancerError) as e:
        raise ClusterError(str(e)) from None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Replica(ServerProcess):
    """One `sllm-cloud serve` of the cluster, `index` in its list; a restart asks for the port it got first."""

    def __init__(self, index: int, command: list[str], env: dict, log_path: Path, host: str,
                 on_event: Callable[["Replica", dict], None], **options):
        super().__init__(command, name=f"replica {index}", listen=f"{host}:0", env=env, log_path=log_path,
                         on_event=lambda entry: on_event(self, entry), **options)
        self.index = index


class HealthWatch:
    """Follows one replica's health in a thread: on_change(serving) on every change. While SERVING it
    holds a grpc.health.v1 Watch (a change arrives at once); otherwise it asks (Check) every
    `retry_s`, so that it holds no stream open on a draining replica (which would wait for it) and
    sees a restarted one come back. A replica that cannot be reached is not serving."""

    def __init__(self, address: str, on_change: Callable[[bool], None], retry_s: float = 0.2):
        self.address, self.on_change, self.retry_s = address, on_change, retry_s
        self.serving: bool | None = None
        self._stop = threading.Event()
        self._call = None
        self._channel = grpc.insecure_channel(address, options=[("grpc.initial_reconnect_backoff_ms", 100),
                                                                ("grpc.min_reconnect_backoff_ms", 100),
                                                                ("grpc.max_reconnect_backoff_ms", 500)])
        self._thread = threading.Thread(target=self._run, name=f"sllm-health-{address}", daemon=True)
        self._thread.start()

    def _set(self, serving: bool) -> None:
        if serving != self.serving:
            self.serving = serving
            self.on_change(serving)

    def _run(self) -> None:
        stub = health_pb2_grpc.HealthStub(self._channel)
        request = health_pb2.HealthCheckRequest()  # the whole server
        serving_status = health_pb2.HealthCheckResponse.SERVING
        while not self._stop.is_set():
            try:
                if self.serving:
                    self._call = stub.Watch(request)
                    still_serving = True
                    for reply in self._call:
                        if reply.status != serving_status:
                            still_serving = False
                            break
                    if still_serving and self._call.code() == grpc.StatusCode.OK:
                        continue  # the replica ended the Watch at the end of its lifetime: watch again
                    self._call.cancel()
                    self._set(False)
                else:
                    self._set(stub.Check(request, timeout=max(self.retry_s, 1.0)).status == serving_status)
            except grpc.RpcError:
                if self._stop.is_set():
                    return
                self._set(False)
            if not self.serving:
                self._stop.wait(self.retry_s)

    def close(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self._thread.join(timeout=5)
        self._channel.close()


@dataclass
class ClusterConfig:
    bundle: Path
    replicas: int = 2
    host: str = "127.0.0.1"  # nginx and the replicas: loopback (plaintext HTTP/2)
    port: int = 0  # nginx's port; 0 = any free port
    tokens: list[str] = field(default_factory=list)  # shared by the replicas; empty = no auth (loopback)
    grace_s: float = 10.0  # each replica's drain on SIGTERM
    threads: int = 0  # torch threads per replica; 0 = its default
    serve_args: list[str] = field(default_factory=list)  # more `sllm-cloud serve` options
    restart: bool = False  # start a replica again when its process ends (not on stop())
    startup_timeout_s: float = 120.0


class Cluster:
    """N replicas + nginx + health watchers; `start()`, `stop()`, and the fault tools the tests use
    (`signal_replica`, `restart_replica`, `restart_balancer`, `wait_routed`)."""

    def __init__(self, config: ClusterConfig, directory: Path | None = None,
                 say: Callable[[str], None] = lambda message: None):
        self.config, self.say = config, say
        nginx = find_nginx()
        if nginx is None:
            raise ClusterError(f"nginx is not installed: {NGINX_INSTALL_HINT}")
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="sllm-cluster-")
        self.directory = Path(directory or self._tmp.name).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        c = config
        command, env = serve_command(Path(c.bundle).resolve(), "--grace", f"{c.grace_s:g}", *c.serve_args,
                                     threads=c.threads)
        self.replicas = [Replica(i, command, env, self.directory / f"replica-{i}.log", c.host, self._replica_event,
                                 startup_timeout=c.startup_timeout_s, tokens=c.tokens) for i in range(c.replicas)]
        self.port = c.port or _free_port(c.host)
        self.balancer = Balancer(nginx, self.directory, f"{c.host}:{self.port}")
        self.up: list[bool] = [False] * c.replicas  # in nginx's config (SERVING, by the watchers)
        self.reloads = 0
        self._lock = threading.RLock()
        self._watches: list[HealthWatch] = []
        self._stopping = False
        self._monitor: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def _replica_event(self, replica: Replica, entry: dict) -> None:
        event = entry.get("event")
        if event in ("server_start", "server_draining", "server_stop", "not_serving", "model_thread_died"):
            self.say(f"replica {replica.index} (pid {replica.pid}): {event}"
                     + (f" on {entry.get('address')}" if event == "server_start" else ""))

    def _routes(self) -> list[tuple[str, bool]]:
        return [(r.address, up) for r, up in zip(self.replicas, self.up)]

    # ------------------------------------------------------------ start / stop

    def start(self) -> "Cluster":
        try:
            with _as_cluster_error():
                for r in self.replicas:
                    r.spawn()
                for r in self.replicas:
                    r.wait_ready()
                self.up = [True] * len(self.replicas)
                self.balancer.start(self._routes())
            self._watches = [HealthWatch(r.address, lambda serving, i=r.index: self._health(i, serving))
                             for r in self.replicas]
            self._monitor = threading.Thread(target=self._watch_processes, name="sllm-cluster-monitor", daemon=True)
            self._monitor.start()
        except BaseException:
            self.stop()
            raise
        self.say(f"nginx (pid {self.balancer.pid}) on {self.address}: {len(self.replicas)} replicas "
                 f"({', '.join(r.address for r in self.replicas)}), affinity on the {SESSION_KEY_HEADER} header")
        return self

    def _health(self, index: int, serving: bool) -> None:
        with self._lock:
            if self._stopping or self.up[index] == serving:
                return
            self.up[index] = serving
            ok = self.balancer.reload(self._routes())
            self.reloads += 1
        self.say(f"balancer: replica {index} {'in' if serving else 'out'} "
                 f"({'SERVING' if serving else 'not serving'}){'' if ok else ' (nginx did not confirm the reload)'}")

    def _watch_processes(self) -> None:
        told: set[int] = set()  # pids whose exit was said
        while not self._stopping:
            time.sleep(0.2)
            for r in self.replicas:
                if not self._stopping and r.proc is not None and not r.running() and r.pid not in told:
                    told.add(r.pid)
                    code = r.wait(1)
                    if not self.config.restart:
                        self.say(f"replica {r.index} exited (code {code})")
                    elif not self._stopping:
                        self.say(f"replica {r.index} exited (code {code}); starting it again on {r.address}")
                        try:
                            self.restart_replica(r.index)
                        except ClusterError as e:
                            self.say(str(e))
            if not self._stopping and not self.balancer.running():
                self.say(f"nginx exited (code {self.balancer.proc.returncode}); see {self.balancer.error_log}")
                return

    def stop(self, grace: bool = True) -> None:
        """Replicas drain (SIGTERM) while nginx finishes what it carries, then everything is stopped."""
        self._stopping = True
        for w in self._watches:
            w.close()
        for r in self.replicas:
            r.send(signal.SIGTERM if grace else signal.SIGKILL)
        for r in self.replicas:
            r.stop(self.config.grace_s + 10 if grace else 5, sig=None)
        self.balancer.stop(5, signal.SIGQUIT if grace else signal.SIGTERM)
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=False)

    # ------------------------------------------------------------ faults and checks

    def signal_replica(self, index: int, sig: int) -> None:
        self.replicas[index].send(sig)

    def restart_replica(self, index: int) -> None:
        """Start replica `index` again on its port (after it exited); returns once it is SERVING."""
        r = self.replicas[index]
        if r.running():
            raise ClusterError(f"replica {index} is still running")
        with _as_cluster_error():
            r.start()

    def restart_balancer(self) -> None:
        """Stop nginx at once (its connections close: every client reconnects) and start it again."""
        self.balancer.stop(5, signal.SIGTERM)
        with self._lock, _as_cluster_error():
            self.balancer.start(self._routes())

    def wait_routed(self, up: list[bool], timeout: float = 10.0) -> None:
        """Wait until nginx's config marks exactly the replicas `up` as up."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self.up == up:
                    return
            if time.monotonic() > deadline:
                raise ClusterError(f"the balancer routes to {self.up}, expected {up} after {timeout:g} s")
            time.sleep(0.01)

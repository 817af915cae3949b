"""The one launcher of `sllm-cloud serve`: start it in its own process, wait until it serves, stop it.

    with ServerProcess.serve(bundle, "--grace", "1", tokens=[token]) as server:   # started, SERVING
        talk to server.address
    # stopped: SIGTERM (it drains), SIGKILL after a bounded wait; also on errors

Used by `edge-chat --local`, the local cluster's replicas (cloud.cluster), the tests and the benches.
Ready means: its `server_start` JSON log line has come (the address it listens on: port 0 lets the
OS pick, and a restart asks for the same port again), then its grpc.health.v1 check says SERVING.
Bearer tokens travel in its environment, never on a command line. Torch-free (the edge imports it);
grpc's health stubs are imported only when a health check is made.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from sllm.runtime.procs import LoggedChild

TOKENS_ENV = "SLLM_CLOUD_TOKENS"  # the bearer tokens `sllm-cloud serve` accepts, comma-separated
TOKEN_ENV = "SLLM_CLOUD_TOKEN"  # the edge's one token; the server reads it too (so it never starts open)


class ServerError(RuntimeError):
    """The server did not become ready; the message says why, with its last output lines."""


class ServerProcess(LoggedChild):
    """A server that prints JSON log lines, one of them {"event": "server_start", "address": ...}.

    listen: "HOST:PORT" passed as --host/--port (None: the command says where it listens).
    tokens: None keeps the environment's token variables; a list is exactly the tokens it accepts.
    health: also wait for grpc.health.v1 SERVING (a server without the health service: False).
    on_event(entry): every JSON log line, from the thread that reads them."""

    def __init__(self, command: list[str], *, name: str = "the cloud server", listen: str | None = "127.0.0.1:0",
                 tokens: list[str] | None = None, env: dict | None = None, health: bool = True,
                 startup_timeout: float = 120.0, stop_timeout: float = 10.0, log_path: Path | None = None,
                 on_event: Callable[[dict], None] | None = None, cwd: Path | None = None):
        super().__init__(name, log_path=log_path, on_line=self._line, cwd=cwd)
        self.command, self.listen, self.health, self.on_event = list(command), listen, health, on_event
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self.env = dict(os.environ if env is None else env)
        if tokens is not None:
            self.env[TOKENS_ENV] = ",".join(tokens)
            self.env.pop(TOKEN_ENV, None)
        self.info: dict = {}  # its server_start line
        self._started = threading.Event()

    @classmethod
    def serve(cls, bundle: str | Path, *options: str, threads: int = 0, env: dict | None = None,
              **kwargs) -> "ServerProcess":
        """`sllm-cloud serve --bundle BUNDLE OPTIONS` (see serve_command)."""
        command, env = serve_command(bundle, *options, threads=threads, env=env)
        return cls(command, env=env, **kwargs)

    @property
    def address(self) -> str | None:
        return self.info.get("address")

    def _line(self, line: str) -> None:
        if not line.startswith("{"):
            return
        try:
            entry = json.loads(line)
        except ValueError:
            return
        if not isinstance(entry, dict):
            return
        if entry.get("event") == "server_start" and not self._started.is_set():
            self.info = entry
            port = str(entry.get("address", "")).rpartition(":")[2]
            if self.listen is not None and port.isdigit():  # a restart asks for the same port
                self.listen = f"{self.listen.rpartition(':')[0]}:{port}"
            self._started.set()
        if self.on_event is not None:
            self.on_event(entry)

    # ------------------------------------------------------------ start

    def spawn(self) -> None:
        """Start it without waiting (several can then start side by side); `wait_ready` next."""
        self._started.clear()  # self.info stays until the new start line: a restart keeps its address
        command = self.command
        if self.listen is not None:
            host, port = self.listen.rsplit(":", 1)
            command = [*command, "--host", host, "--port", port]
        try:
            self.spawn_command(command, self.env)
        except OSError as e:
            raise ServerError(f"cannot start {self.name} ({command[0]}): {e}") from None

    def wait_ready(self, timeout: float | None = None) -> dict:
        """Its server_start line once it is ready (SERVING, with health); ServerError, and it is
        stopped, if it exits or is not ready within `timeout` (default startup_timeout) seconds."""
        timeout = self.startup_timeout if timeout is None else timeout
        try:
            self._wait_ready(time.monotonic() + timeout, timeout)
        except BaseException:
            self.stop(self.stop_timeout)
            raise
        return self.info

    def start(self) -> "ServerProcess":
        self.spawn()
        self.wait_ready()
        return self

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        while not self._started.wait(0.05):
            self._check_alive()
            if time.monotonic() > deadline:
                raise ServerError(f"{self.name} did not start within {timeout:g} s; its last lines:\n"
                                  f"{self.last_lines()}")
        if not self.health:
            return
        while not serving(self.address, timeout=1.0):
            self._check_alive()
            if time.monotonic() > deadline:
                raise ServerError(f"{self.name} at {self.address} was not healthy (SERVING) within {timeout:g} s; "
                                  f"its last lines:\n{self.last_lines()}")
            time.sleep(0.05)

    def _check_alive(self) -> None:
        if not self.running():
            code = self.wait(2)  # its last words read
            raise ServerError(f"{self.name} exited (code {code}) before it was ready; its last lines:\n"
                              f"{self.last_lines()}")

    # ------------------------------------------------------------ stop

    def stop(self, timeout: float | None = None, sig: int | None = signal.SIGTERM) -> int | None:
        """SIGTERM (it drains for its --grace; None: signalled already), SIGKILL after `timeout`
        (default stop_timeout) seconds; its exit code."""
        return super().stop(self.stop_timeout if timeout is None else timeout, sig)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_command(bundle: str | Path, *options: str, threads: int = 0,
                  env: dict | None = None) -> tuple[list[str], dict]:
    """(command, environment) of `sllm-cloud serve --bundle BUNDLE OPTIONS` run by this interpreter
    (no console script needed), with `threads` torch threads (0: torch's default)."""
    command = [sys.executable, "-m", "sllm.cloud.cli", "serve", "--bundle", str(bundle), *map(str, options)]
    env = dict(os.environ if env is None else env)
    if threads:
        command += ["--threads", str(threads)]
        env["OMP_NUM_THREADS"] = str(threads)
    return command, env


def serving(address: str, timeout: float = 1.0) -> bool:
    """Does the server at `address` (plaintext) say SERVING on grpc.health.v1, for the whole server?"""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING

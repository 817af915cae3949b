"""`edge-chat --local`: a cloud server on loopback for the length of one chat.

    with LocalServer(Path("models/default/cloud")) as server:   # started, healthy
        chat with server.address, server.token
    # stopped (SIGTERM, then SIGKILL after a bounded wait), also on Ctrl-C and errors

The server is `python -m sllm.cloud.cli serve` (the `sllm-cloud serve` command) in its own process
session (a Ctrl-C in the terminal reaches only the chat), on 127.0.0.1 with a port the OS
picks (read back from its `server_start` log line) and a random bearer token passed through
its environment (never on a command line). On Linux it also gets PR_SET_PDEATHSIG, so it dies
with the chat even if the chat is killed with SIGKILL. Its log lines are drained all along (a full
pipe would block it); the last ones are shown when it fails to start.
"""
from __future__ import annotations

import collections
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from sllm.edge.chat import EdgeError
from sllm.runtime.procs import stop_process, with_parent_death_signal
from sllm.runtime.roles import role_problem

TOKENS_ENV = "SLLM_CLOUD_TOKENS"  # what `sllm-cloud serve` reads its tokens from
HEALTH_SERVICE = "sllm.v1.SentenceLM"
TAIL_LINES = 15


class LocalServer:
    def __init__(self, cloud_bundle: Path, *, startup_timeout: float = 120.0, threads: int = 0,
                 device: str = "auto", command: list[str] | None = None, stop_timeout: float = 10.0):
        self.bundle = Path(cloud_bundle)
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.token = secrets.token_urlsafe(24)
        self.default_command = command is None  # `python -m sllm.cloud.cli serve` in this environment
        self.command = command or [
            sys.executable, "-m", "sllm.cloud.cli", "serve", "--bundle", str(self.bundle), "--host", "127.0.0.1",
            "--port", "0", "--grace", "1", "--device", device, "--threads", str(max(0, threads))]
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.info: dict = {}
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._started = threading.Event()
        self._reader: threading.Thread | None = None

    # ------------------------------------------------------------ start

    def start(self) -> "LocalServer":
        if self.default_command:  # an edge install has no torch: say so before starting anything
            problem = role_problem("cloud", "edge-chat --local")
            if problem is not None:
                raise EdgeError(f"{problem}; or chat with a running server: --server HOST:PORT")
        env = {**os.environ, TOKENS_ENV: self.token}
        try:
            self.proc = subprocess.Popen(
                with_parent_death_signal(self.command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, env=env, start_new_session=True, text=True, errors="replace", bufsize=1)
        except OSError as e:
            raise EdgeError(f"cannot start the local cloud server ({self.command[0]}): {e}") from None
        self._reader = threading.Thread(target=self._read_logs, name="sllm-local-server-logs", daemon=True)
        self._reader.start()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _read_logs(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self._tail.append(line)
            if not self._started.is_set() and '"server_start"' in line:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("event") == "server_start":
                    self.info = entry
                    self.address = entry.get("address")
                    self._started.set()

    def tail(self) -> str:
        lines = list(self._tail)
        return "\n".join(f"    {ln}" for ln in lines) if lines else "    (it printed nothing)"

    def _wait_healthy(self) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + self.startup_timeout
        while not self._started.wait(0.05):
            self._check_alive()
            if time.monotonic() > deadline:
                raise EdgeError(f"the local cloud server did not start within {self.startup_timeout:g} s; "
                                f"its last lines:\n{self.tail()}")
        channel = grpc.insecure_channel(self.address)
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive()
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=HEALTH_SERVICE), timeout=1.0).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise EdgeError(f"the local cloud server at {self.address} was not healthy (SERVING) within "
                                    f"{self.startup_timeout:g} s; its last lines:\n{self.tail()}")
                time.sleep(0.05)
        finally:
            channel.close()

    def _check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            if self._reader is not None:
                self._reader.join(timeout=2)  # collect its last words
            raise EdgeError(f"the local cloud server exited (code {code}) before it was ready; its last lines:\n"
                            f"{self.tail()}")

    # ------------------------------------------------------------ stop

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM (it drains for 1 s), then SIGKILL after `stop_timeout`; returns its exit code."""
        proc = self.proc
        if proc is None:
            return None
        stop_process(proc, self.stop_timeout)
        if self._reader is not None:
            self._reader.join(timeout=2)
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

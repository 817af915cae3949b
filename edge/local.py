"""`edge-chat --local`: a cloud server on loopback for the length of one chat.

    with LocalServer(Path("models/default/cloud")) as server:   # started, healthy
        chat with server.address, server.token
    # stopped (SIGTERM, then SIGKILL after a bounded wait), also on Ctrl-C and errors

The server is `sllm-cloud serve` started by the one launcher (runtime.server_process): its own
process session (a Ctrl-C in the terminal reaches only the chat), 127.0.0.1 and a port the OS picks,
a random bearer token in its environment, and on Linux it dies with the chat even on SIGKILL. What
this adds: the check that this install can run a server at all, and errors in the edge's words.
"""
from __future__ import annotations

import secrets
from pathlib import Path

from sllm.edge.chat import EdgeError
from sllm.runtime.roles import role_problem
from sllm.runtime.server_process import ServerError, ServerProcess, serve_command


class LocalServer(ServerProcess):
    def __init__(self, cloud_bundle: Path, *, startup_timeout: float = 120.0, threads: int = 0,
                 device: str = "auto", command: list[str] | None = None, stop_timeout: float = 10.0):
        self.token = secrets.token_urlsafe(24)
        self.default_command = command is None  # `sllm-cloud serve` in this environment
        options = dict(name="the local cloud server", tokens=[self.token], startup_timeout=startup_timeout,
                       stop_timeout=stop_timeout)
        if command is None:
            command, options["env"] = serve_command(cloud_bundle, "--grace", "1", "--device", device,
                                                    threads=max(0, threads))
        super().__init__(command, **options)

    def start(self) -> "LocalServer":
        if self.default_command:  # an edge install has no torch: say so before starting anything
            problem = role_problem("cloud", "edge-chat --local")
            if problem is not None:
                raise EdgeError(f"{problem}; or chat with a running server: --server HOST:PORT")
        try:
            super().start()
        except ServerError as e:
            raise EdgeError(str(e)) from None
        return self

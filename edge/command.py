"""The `edge-chat` console script: what must happen before the edge's libraries load. In an
install without ONNX Runtime it says which install to add, in one line (exit 2), as every role's
command does; gRPC's own log lines stay off unless --verbose (gRPC reads that once, at import)."""
from __future__ import annotations

import sys

from sllm.runtime.console import quiet_grpc, run_command
from sllm.runtime.roles import require_role


def main() -> None:
    require_role("edge", "edge-chat")
    quiet_grpc(sys.argv[1:])
    from sllm.edge.cli import app

    run_command(app, "edge-chat", verbose=True)

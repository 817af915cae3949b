"""Child processes that die with their parent: `edge-chat --local`'s server, `sllm-cloud cluster`'s
replicas and nginx.

On Linux the child gets PR_SET_PDEATHSIG (SIGTERM when the parent dies, even by SIGKILL), set by a
tiny launcher that then execs the command: no Python code runs between fork and exec in the parent
(a preexec_fn there crashes when gRPC threads are running). Elsewhere the command runs as it is."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

_LAUNCHER = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):  # the parent died before prctl
    sys.exit(0)
os.execv(sys.argv[2], sys.argv[2:])
"""


def with_parent_death_signal(command: list[str]) -> list[str]:
    """`command` (its first item an executable path) wrapped so that it gets SIGTERM when this process dies."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-S", "-E", "-c", _LAUNCHER, str(os.getpid()), *command]


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """`sig` to the process group of `proc` (started with start_new_session), else to `proc` alone."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError, AttributeError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def stop_process(proc: subprocess.Popen, timeout: float, sig: int | None = signal.SIGTERM) -> int | None:
    """`sig` to its group (None: it has been signalled already), then SIGKILL after `timeout` seconds;
    its exit code."""
    if proc.poll() is None:
        if sig is not None:
            signal_group(proc, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=10)
    return proc.returncode

"""Child processes that die with their parent: cloud servers (runtime.server_process), nginx.

On Linux the child gets PR_SET_PDEATHSIG (SIGTERM when the parent dies, even by SIGKILL), set by a
tiny launcher that then execs the command: no Python code runs between fork and exec in the parent
(a preexec_fn there crashes when gRPC threads are running). Elsewhere the command runs as it is.
The signal follows the *thread* that spawned the child: spawn from a thread that outlives it."""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

TAIL_LINES = 15  # output lines kept for an error message

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


class LoggedChild:
    """A command in its own process session (a Ctrl-C in the terminal does not reach it) that dies
    with this process. Its stdout and stderr, merged, are read line by line in a thread all along (a
    full pipe would block it): appended to `log_path` if given, passed to `on_line`, the last
    TAIL_LINES kept for an error message. It may be spawned again once it has exited (a restart)."""

    def __init__(self, name: str, *, log_path: Path | None = None, on_line: Callable[[str], None] | None = None,
                 cwd: Path | None = None):
        self.name, self.log_path, self.on_line, self.cwd = name, log_path, on_line, cwd
        self.proc: subprocess.Popen | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._reader: threading.Thread | None = None

    def spawn_command(self, command: list[str], env: dict | None = None) -> None:
        """Start `command`; OSError if it cannot be executed."""
        self.tail.clear()
        self.proc = subprocess.Popen(with_parent_death_signal(command), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=self.cwd,
                                     start_new_session=True, text=True, errors="replace", bufsize=1)
        self._reader = threading.Thread(target=self._read, args=(self.proc,), name=f"sllm-log-{self.proc.pid}",
                                        daemon=True)
        self._reader.start()

    def _read(self, proc: subprocess.Popen) -> None:
        log = open(self.log_path, "a") if self.log_path else None
        try:
            for line in proc.stdout:
                if log is not None:
                    log.write(line)
                    log.flush()
                line = line.rstrip("\n")
                self.tail.append(line)
                if self.on_line is not None:
                    self.on_line(line)
        finally:
            if log is not None:
                log.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        if self.running():
            signal_group(self.proc, sig)

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit code once it has exited (subprocess.TimeoutExpired after `timeout`), its last lines read."""
        if self.proc is None:
            return None
        code = self.proc.wait(timeout)
        self._join()
        return code

    def stop(self, timeout: float, sig: int | None = signal.SIGTERM) -> int | None:
        """`sig` to its group (None: signalled already), SIGKILL after `timeout` seconds; its exit code."""
        if self.proc is None:
            return None
        code = stop_process(self.proc, timeout, sig)
        self._join()
        return code

    def _join(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=2)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()

    def last_lines(self) -> str:
        """Its last output lines, indented, for an error message."""
        return "\n".join(f"    {ln}" for ln in self.tail) or "    (it printed nothing)"

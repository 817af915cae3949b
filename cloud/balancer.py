"""nginx in front of the replicas on this machine: the shipped `nginx.conf` adapted to loopback, and
nginx run in the foreground with that config, reloaded when the replicas in it change.

`nginx.conf` beside this file is the one balancer configuration (deployments use it as it is, see
docs/deploy/README.md); `loopback_config` changes only what a loopback cluster must: its replicas for
the upstream servers, its listener, paths in its own folder, no TLS. It never writes routing of its
own: hashing, timeouts and the UNAVAILABLE answer are the shipped file's.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from sllm.runtime.procs import TAIL_LINES, LoggedChild

SHIPPED_CONFIG = Path(__file__).with_name("nginx.conf")
NGINX_INSTALL_HINT = "install nginx (Debian/Ubuntu: apt-get install nginx; macOS: brew install nginx)"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")  # nginx's defaults need root
# one directive on a line: indent, name, arguments (a block opener `name ... {` is not one)
_DIRECTIVE = re.compile(r"^(\s*)([a-z_0-9]+)((?:\s+[^;#{]+?)?)\s*;\s*(#.*)?$")


class BalancerError(RuntimeError):
    """nginx refused its config or did not start; the message says why."""


def find_nginx() -> str | None:
    """The nginx binary: on PATH, or where Debian puts it (/usr/sbin may be off a user's PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    return next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/opt/homebrew/bin/nginx")
                 if os.access(p, os.X_OK)), None)


def loopback_config(directory: Path, listen: str, replicas: list[tuple[str, bool]], *,
                    access_log: bool = True, template: str | None = None) -> str:
    """The shipped nginx.conf (or `template`) for `replicas` [(host:port, up)] behind one plaintext
    HTTP/2 listener at `listen` (host:port), in the foreground, with pid file, logs and temp paths in
    `directory`. Replicas not up are marked `down`: nginx sends them nothing, and the keys of the
    others keep their replicas (consistent hashing). Each upstream server gets the parameters of the
    shipped file's first one."""
    d = Path(directory).resolve()
    text = SHIPPED_CONFIG.read_text() if template is None else template
    out = [f"# {SHIPPED_CONFIG.name} of sllm.cloud on loopback (cloud/balancer.py: loopback_config)", "daemon off;"]
    seen: set[str] = set()
    block: list[str] = []  # names of the enclosing blocks
    for line in text.splitlines():
        stripped = line.split("#", 1)[0].strip()
        if stripped.endswith("{"):
            block.append(stripped.split()[0])
            out.append(line)
            if block == ["http"]:
                out += [f"    {kind}_temp_path {d / (kind + '_temp')};" for kind in TEMP_PATHS]
            continue
        if stripped == "}":
            block.pop()
            out.append(line)
            continue
        m = _DIRECTIVE.match(line)
        if m is None:
            out.append(line)
            continue
        indent, name, args = m.group(1), m.group(2), m.group(3).split()
        if name.startswith(("ssl_", "grpc_ssl_")):
            continue  # no TLS on loopback
        if name == "server" and block[-1:] == ["upstream"]:
            if "server" not in seen:
                out += [f"{indent}server {address} {' '.join(args[1:])}{'' if up else ' down'};"
                        for address, up in replicas]
            seen.add(name)
            continue
        replaced = {
            "worker_processes": "1",
            "pid": str(d / "nginx.pid"),
            "error_log": " ".join([str(d / "error.log"), *args[1:]]),
            "access_log": " ".join([str(d / "access.log"), *args[1:]]) if access_log else "off",
            "listen": f"{listen} http2",
            "grpc_pass": " ".join(args).replace("grpcs://", "grpc://"),
        }.get(name)
        if replaced is None:
            out.append(line)
        else:
            out.append(f"{indent}{name} {replaced};")
            seen.add(name)
    missing = {"pid", "error_log", "access_log", "listen", "grpc_pass", "server"} - seen
    if missing:
        raise BalancerError(f"the nginx config has no {', '.join(sorted(missing))} directive to adapt to loopback")
    return "\n".join(out) + "\n"


class Balancer(LoggedChild):
    """nginx in the foreground, its config rewritten and reloaded (SIGHUP) on change."""

    def __init__(self, nginx: str, directory: Path, listen: str):
        super().__init__("nginx", log_path=directory / "nginx.out")  # nginx itself writes to error.log
        self.nginx, self.directory, self.listen = nginx, directory, listen
        self.config_path = directory / "nginx.conf"
        self.error_log = directory / "error.log"

    def write_config(self, replicas: list[tuple[str, bool]]) -> None:
        text = loopback_config(self.directory, self.listen, replicas)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def _count_workers(self) -> int:
        try:
            return self.error_log.read_text(errors="replace").count("start worker process ")
        except OSError:
            return 0

    def _wait_workers(self, more_than: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._count_workers() <= more_than:
            if not self.running() or time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def start(self, replicas: list[tuple[str, bool]], timeout: float = 10.0) -> None:
        self.write_config(replicas)
        args = ["-p", str(self.directory), "-c", str(self.config_path), "-e", str(self.error_log)]
        test = subprocess.run([self.nginx, "-t", "-q", *args], capture_output=True, text=True, timeout=30)
        if test.returncode != 0:
            raise BalancerError(f"nginx refused the config {self.config_path}:\n{test.stderr.strip()}")
        before = self._count_workers()
        try:
            self.spawn_command([self.nginx, *args])
        except OSError as e:
            raise BalancerError(f"cannot start nginx ({self.nginx}): {e}") from None
        if not self._wait_workers(before, timeout) or not self._accepts(timeout):
            self.stop(5)
            raise BalancerError(f"nginx did not start listening on {self.listen}; {self.error_log}:\n"
                                + "\n".join(self.error_log.read_text(errors="replace").splitlines()[-TAIL_LINES:]))

    def _accepts(self, timeout: float) -> bool:
        host, port = self.listen.rsplit(":", 1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.02)
        return False

    def reload(self, replicas: list[tuple[str, bool]], timeout: float = 10.0) -> bool:
        """New config, SIGHUP; True once a new worker runs it (old workers finish their streams, for
        at most the shipped file's worker_shutdown_timeout)."""
        self.write_config(replicas)
        before = self._count_workers()
        self.send(signal.SIGHUP)
        return self._wait_workers(before, timeout)

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGQUIT) -> int | None:
        """SIGQUIT: graceful (open streams get the worker_shutdown_timeout); SIGTERM: fast."""
        return super().stop(timeout, sig)

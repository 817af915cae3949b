"""Counters and gauges of the service, as the Stats message and as Prometheus text."""
from __future__ import annotations

import socket
import threading
import time
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RATE_WINDOW_S = 5.0


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.steps_total = 0
        self.sentences_total = 0
        self.forward_passes_total = 0
        self.batch_sizes: Counter[int] = Counter()
        self.max_batch_size_seen = 0
        self.errors_by_code: Counter[str] = Counter()
        self.sessions_opened_total = 0
        self.sessions_evicted_total = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, steps) per forward pass

    def forward_pass(self, steps: int, sentences: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.forward_passes_total += 1
            self.steps_total += steps
            self.sentences_total += sentences
            self.batch_sizes[steps] += 1
            self.max_batch_size_seen = max(self.max_batch_size_seen, steps)
            self._recent.append((now, steps))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def error(self, code_name: str) -> None:
        with self.lock:
            self.errors_by_code[code_name] += 1

    def session_opened(self) -> None:
        with self.lock:
            self.sessions_opened_total += 1

    def session_evicted(self) -> None:
        with self.lock:
            self.sessions_evicted_total += 1

    def snapshot(self) -> dict:
        now = time.monotonic()
        with self.lock:
            self._trim(now)
            uptime = now - self.started
            window = min(RATE_WINDOW_S, max(uptime, 1e-3))
            return {
                "steps_total": self.steps_total,
                "sentences_total": self.sentences_total,
                "forward_passes_total": self.forward_passes_total,
                "mean_batch_size": self.steps_total / self.forward_passes_total if self.forward_passes_total else 0.0,
                "max_batch_size_seen": self.max_batch_size_seen,
                "steps_per_second": sum(n for _, n in self._recent) / window,
                "sessions_opened_total": self.sessions_opened_total,
                "sessions_evicted_total": self.sessions_evicted_total,
                "errors_by_code": dict(self.errors_by_code),
                "batch_size_histogram": dict(self.batch_sizes),
                "uptime_s": uptime,
            }


_HELP = {
    "sessions": ("gauge", "sessions held (attached + detached)"),
    "attached_sessions": ("gauge", "sessions with an open stream"),
    "kv_bytes": ("gauge", "KV cache bytes held by all sessions"),
    "kv_budget_bytes": ("gauge", "KV cache budget"),
    "queue_depth": ("gauge", "steps waiting for the model"),
    "steps_total": ("counter", "steps answered"),
    "sentences_total": ("counter", "sentence vectors run through the model"),
    "forward_passes_total": ("counter", "batched forward passes"),
    "mean_batch_size": ("gauge", "steps per forward pass since start"),
    "steps_per_second": ("gauge", "steps per second over the last 5 s"),
    "sessions_opened_total": ("counter", "sessions opened"),
    "sessions_evicted_total": ("counter", "sessions freed by the idle timeout or the KV budget"),
    "uptime_s": ("gauge", "seconds since the server started"),
    "pending_streams": ("gauge", "Converse streams that have not sent their Open yet"),
    "streams_open": ("gauge", "Converse streams being handled"),
    "health_watches": ("gauge", "grpc.health.v1 Watch streams open"),
    "health_watches_ended_total": ("counter", "Watch streams ended for room (per-address or total limit)"),
    "speculation_stopped_total": ("counter", "sessions that may guess no more (too many of their guesses dropped)"),
    "pending_streams_evicted_total": ("counter", "streams ended because too many were waiting to send their Open"),
}


def _num(v) -> str:
    return str(int(v)) if isinstance(v, int) or float(v).is_integer() else repr(float(v))


def prometheus_text(stats: dict, prefix: str = "sllm_cloud_") -> str:
    """Prometheus text exposition format (version 0.0.4) of a stats dict."""
    lines = []
    for key, (kind, help_) in _HELP.items():
        if key in stats:
            lines += [f"# HELP {prefix}{key} {help_}", f"# TYPE {prefix}{key} {kind}",
                      f"{prefix}{key} {_num(stats[key])}"]
    lines += [f"# HELP {prefix}errors_total RPCs ended with a non-OK status", f"# TYPE {prefix}errors_total counter"]
    for code, n in sorted(stats.get("errors_by_code", {}).items()):
        lines.append(f'{prefix}errors_total{{code="{code}"}} {n}')
    lines += [f"# HELP {prefix}batch_size_passes_total forward passes by batch size",
              f"# TYPE {prefix}batch_size_passes_total counter"]
    for size, n in sorted(stats.get("batch_size_histogram", {}).items()):
        lines.append(f'{prefix}batch_size_passes_total{{size="{size}"}} {n}')
    owners = stats.get("by_owner", {})  # per caller, under a keyed hash of its token or certificate
    for key, kind, help_ in (("sessions", "gauge", "sessions held by one caller"),
                             ("kv_bytes", "gauge", "KV cache bytes held by one caller"),
                             ("quota_refused_total", "counter", "requests refused for one caller's quota"),
                             ("guess_seconds_total", "counter", "model-thread seconds spent guessing for one caller")):
        lines += [f"# HELP {prefix}owner_{key} {help_}", f"# TYPE {prefix}owner_{key} {kind}"]
        for tag, usage in sorted(owners.items()):
            lines.append(f'{prefix}owner_{key}{{owner="{tag}"}} {_num(usage[key])}')
    return "\n".join(lines) + "\n"


class _HTTPServer6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class MetricsHTTPServer:
    """GET /metrics -> Prometheus text, in a daemon thread. No auth and no TLS: bind it to loopback
    (the default) unless the network in between is trusted."""

    def __init__(self, host: str, port: int, stats_fn):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                body = prometheus_text(stats_fn()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet: the service logs JSON
                pass

        host = host.strip("[]")
        server_class = _HTTPServer6 if ":" in host else ThreadingHTTPServer
        self.httpd = server_class((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="sllm-metrics", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

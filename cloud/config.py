"""Server settings and limits (the `sllm-cloud serve` flags map one to one onto these fields)."""
from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1 << 20


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (tests)
    # limits
    max_sessions: int = 256  # sessions held at once (attached + detached)
    max_sentences: int = 0  # sentences one session may hold; 0 = the model's max positions (never more)
    idle_timeout_s: float = 300.0  # a session untouched this long is freed (its stream, if open, ends)
    max_message_bytes: int = 4 * MIB  # larger messages: RESOURCE_EXHAUSTED (grpc)
    kv_budget_bytes: int = 1024 * MIB  # all sessions' KV caches together
    max_abs: float = 1e4  # largest |value| accepted in a sentence vector
    # batching
    batching: bool = True  # off: one session's step per forward pass (benchmarks)
    max_batch: int = 64  # steps in one forward pass
    batch_wait_ms: float = 0.0  # after the first pending step, wait this long for more
    # runtime
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "float32"  # compute dtype: float32, or float16 / bfloat16 (GPU)
    threads: int = 0  # torch threads; 0 = torch's default
    grace_s: float = 10.0  # shutdown: open streams get this long to finish
    # security
    tokens: list[str] = field(default_factory=list)  # bearer tokens; empty = no auth
    tls_cert: str = ""  # PEM files; both set = TLS
    tls_key: str = ""
    # observability
    metrics_port: int = -1  # Prometheus text on http://host:port/metrics; -1 = off, 0 = any free port
    log_steps: bool = False  # a JSON log line per forward pass

    def validate(self) -> None:
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if self.max_sentences < 0:
            raise ValueError("max_sentences must be >= 0 (0 = the model's limit)")
        if self.idle_timeout_s <= 0:
            raise ValueError("idle_timeout_s must be > 0")
        if self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be >= 1024")
        if self.kv_budget_bytes < 1:
            raise ValueError("kv_budget_bytes must be >= 1")
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if self.batch_wait_ms < 0:
            raise ValueError("batch_wait_ms must be >= 0")
        if self.max_abs <= 0:
            raise ValueError("max_abs must be > 0")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both a certificate and a key file")
        if any(not t or any(c.isspace() for c in t) for t in self.tokens):
            raise ValueError("bearer tokens must be non-empty and contain no whitespace")

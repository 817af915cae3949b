"""Server settings and limits (the `sllm-cloud serve` flags map one to one onto these fields)."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

MIB = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 4 * MIB  # the floor of the automatic message-size limit


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost). Any other
    name counts as exposed: a hostname may resolve to a public address."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (tests)
    # limits
    max_sessions: int = 256  # sessions held at once (attached + detached); one per open conversation
    max_sentences: int = 0  # sentences one session may hold; 0 = the model's max positions (never more)
    idle_timeout_s: float = 300.0  # a session untouched this long is freed (its stream, if open, ends)
    # largest message; 0 = automatic: 4 MiB, or what a rebuild of a full history needs if more
    max_message_bytes: int = 0
    kv_budget_bytes: int = 1024 * MIB  # all sessions' KV caches together
    max_abs: float = 1e4  # largest |value| accepted in a sentence vector
    open_timeout_s: float = 10.0  # a Converse stream must send its Open within this
    max_pending_streams: int = 64  # streams not yet past their Open; beyond it cloud.service.PendingStreams ends one
    write_timeout_s: float = 30.0  # a reply the client has not taken in this long ends its stream (never read)
    # quotas (with authentication: per token, or per client certificate): the share of max_sessions, of the KV
    # budget and of max_pending_streams one caller may hold; 1 = no quota. Without authentication all callers
    # are one owner and no quota applies
    owner_share: float = 0.25
    # connections (grpc-core): 0 = automatic (the descriptor limit, raised to its hard limit, less a reserve)
    max_connections: int = 0
    max_streams_per_connection: int = 0  # HTTP/2 concurrent streams; 0 = max_sessions + max_pending_streams
    connection_idle_s: float = 300.0  # a connection with no RPC this long is closed (GOAWAY; clients reconnect)
    # a connection is closed after this long (GOAWAY), its RPCs given connection_grace_s more: what bounds the
    # calls of a client that never reads (their handlers end at once, grpc-core frees them with the connection)
    connection_age_s: float = 3600.0
    connection_grace_s: float = 600.0
    handshake_timeout_s: float = 10.0  # TCP accepted but no TLS/HTTP2 handshake (a bare or preface-only socket)
    # grpc.health.v1 Watch (no token needed): streams in all, per peer address, and how long one lasts
    health_watch_max: int = 32
    health_watch_per_peer: int = 4
    health_watch_lifetime_s: float = 60.0
    # batching
    max_batch: int = 64  # steps in one forward pass; 1: one session's step per pass (no batching)
    batch_wait_ms: float = 0.0  # after the first pending step, wait this long for more
    # runtime
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "float32"  # compute dtype: float32, or float16 / bfloat16 (GPU)
    threads: int = 0  # torch threads; 0 = torch's default
    # auto: on a CPU in float32, the small steps (one session, or a few short ones) run in ONNX Runtime
    # (cloud.onnx_step), the rest in torch; torch: every step in torch
    backend: str = "auto"
    grace_s: float = 10.0  # shutdown: open streams get this long to finish
    # draining: a stream with no step for this long (a conversation between turns) is handed back
    # (UNAVAILABLE: its client rebuilds elsewhere on its next turn) instead of holding the drain; 0 = never
    hand_back_idle_s: float = 2.0
    # security
    tokens: list[str] = field(default_factory=list)  # bearer tokens; empty = no auth
    tls_cert: str = ""  # PEM files; both set = TLS
    tls_key: str = ""
    tls_client_ca: str = ""  # PEM CA bundle: client certificates required and verified against it (mTLS)
    insecure: bool = False  # allow a non-loopback address without TLS + authentication (loud warning)
    # observability
    metrics_port: int = -1  # Prometheus text on http://metrics_host:port/metrics; -1 = off, 0 = any free port
    metrics_host: str = "127.0.0.1"  # the metrics endpoint has no auth and no TLS: loopback unless chosen
    log_steps: bool = False  # a JSON log line per forward pass
    # sentence-level speculation (issue 17): sentences a stream may run ahead (what Open.speculate gets at
    # most); 0 = off. Needs the edge bundle's graphs (cloud.guesses): edge_dir, else the edge/ beside the cloud bundle
    speculate_max: int = 16
    speculate_answer_max: int = 64  # sentences of one answer the cloud guesses at most (bounded work per answer)
    edge_dir: str = ""  # an export's edge/ folder: the ONNX graphs the guesses decode with, the edge's own

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def authenticated(self) -> bool:
        """Callers prove who they are: a bearer token or a verified client certificate."""
        return bool(self.tokens) or bool(self.tls_client_ca)

    @property
    def exposed_insecurely(self) -> bool:
        """Listening beyond loopback without TLS or without caller authentication."""
        return not is_loopback(self.host) and not (self.tls and self.authenticated)

    def quota(self, total: int) -> int:
        """One owner's share of a limit of `total` (at least 1); the whole of it without authentication."""
        return max(1, int(total * self.owner_share)) if self.authenticated else total

    def validate(self) -> None:
        for ok, message in (
                (self.max_sessions >= 1, "max_sessions must be >= 1"),
                (self.max_sentences >= 0, "max_sentences must be >= 0 (0 = the model's limit)"),
                (self.idle_timeout_s > 0, "idle_timeout_s must be > 0"),
                (not 0 < self.max_message_bytes < 1024, "max_message_bytes must be >= 1024 (or 0: automatic)"),
                (self.kv_budget_bytes >= 1, "kv_budget_bytes must be >= 1"),
                (self.max_batch >= 1, "max_batch must be >= 1"),
                (self.batch_wait_ms >= 0, "batch_wait_ms must be >= 0"),
                (self.max_abs > 0, "max_abs must be > 0"),
                (self.open_timeout_s > 0, "open_timeout_s must be > 0"),
                (self.hand_back_idle_s >= 0, "hand_back_idle_s must be >= 0 (0 = never)"),
                (self.max_pending_streams >= 1, "max_pending_streams must be >= 1"),
                (self.write_timeout_s > 0, "write_timeout_s must be > 0"),
                (0 < self.owner_share <= 1, "owner_share must be in (0, 1]"),
                (self.max_connections >= 0, "max_connections must be >= 0 (0 = automatic)"),
                (self.max_streams_per_connection >= 0, "max_streams_per_connection must be >= 0 (0 = automatic)"),
                (min(self.connection_idle_s, self.connection_age_s, self.handshake_timeout_s) > 0,
                 "connection timeouts must be > 0"),
                (self.connection_grace_s >= 0, "connection_grace_s must be >= 0"),
                (self.health_watch_max >= 1 and self.health_watch_per_peer >= 1, "health watch limits must be >= 1"),
                (self.health_watch_lifetime_s > 0, "health_watch_lifetime_s must be > 0"),
                (self.speculate_max >= 0, "speculate_max must be >= 0 (0 = no speculation)"),
                (self.speculate_answer_max >= 1, "speculate_answer_max must be >= 1"),
                (self.backend in ("auto", "torch"), f"backend must be auto or torch, got {self.backend!r}"),
                (self.dtype in ("float32", "float16", "bfloat16"),
                 f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")):
            if not ok:
                raise ValueError(message)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both a certificate and a key file")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs TLS: give --tls-cert and --tls-key too")
        if any(not t or any(c.isspace() for c in t) for t in self.tokens):
            raise ValueError("bearer tokens must be non-empty and contain no whitespace")
        if self.exposed_insecurely and not self.insecure:
            missing = " and ".join(w for w, ok in (("TLS (--tls-cert, --tls-key)", self.tls),
                                                   ("authentication (--token-file / $SLLM_CLOUD_TOKENS, or "
                                                    "--tls-client-ca)", self.authenticated)) if not ok)
            raise ValueError(f"refusing to listen on {self.host} without {missing}: anyone who can reach that "
                             "address could use the model and read the traffic. Listen on 127.0.0.1, add "
                             "them, or pass --insecure to serve anyway")

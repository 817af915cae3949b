"""`sllm-cloud`: serve a cloud bundle over gRPC, query a server, make a random bundle.

    sllm-cloud serve --bundle runs/export/cloud --port 50051
    sllm-cloud serve --model org/sllm-small@v1 --port 50051                      # a model-hub id: its cloud/
    sllm-cloud serve --bundle B --host 0.0.0.0 --token-file tokens.txt --tls-cert c.pem --tls-key k.pem
    sllm-cloud serve --bundle B --host 0.0.0.0 --tls-cert c.pem --tls-key k.pem --tls-client-ca clients-ca.pem
    sllm-cloud info --target 127.0.0.1:50051
    sllm-cloud random-bundle /tmp/cloud-d256 --d 256 --layers 4
    sllm-cloud cluster --bundle models/default/cloud --replicas 2 --port 50051   # replicas behind nginx
    sllm-cloud health --target 127.0.0.1:50051                                   # exit 0 iff SERVING (probes)
"""
from __future__ import annotations

from sllm.runtime.roles import require_role

require_role("cloud", "sllm-cloud")  # before anything heavy: one line, not a traceback, in an edge install

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

from sllm.runtime.console import APP_SETTINGS, run_command
from sllm.runtime.server_process import TOKEN_ENV, TOKENS_ENV

app = typer.Typer(**APP_SETTINGS, no_args_is_help=True, help="The sllm cloud gRPC service.")

# Both names are read, the same way (comma-separated, merged): TOKEN_ENV is the edge's name for its
# one token, and a server started with it must not come up open to anyone.
TOKENS_ENVS = (TOKENS_ENV, TOKEN_ENV)
FORCED_EXIT_S = 5.0  # after a second signal, exit at once if the forced stop has not finished by then


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def read_tokens(token_file: Optional[Path]) -> list[str]:
    """Bearer tokens from a file (one per line, # comments) and/or $SLLM_CLOUD_TOKENS and $SLLM_CLOUD_TOKEN
    (comma-separated, both read), without repeats."""
    tokens = []
    if token_file is not None:
        try:
            lines = token_file.read_text().splitlines()
        except OSError as e:
            _fail(f"cannot read the token file: {e}")
        tokens += [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not tokens:
            _fail(f"{token_file} holds no token")
    for name in TOKENS_ENVS:
        tokens += [t.strip() for t in os.environ.get(name, "").split(",") if t.strip()]
    return list(dict.fromkeys(tokens))


@app.command()
def serve(
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="cloud bundle directory (an export's cloud/)"),
    model: Optional[str] = typer.Option(None, "--model", help="instead of --bundle: a folder holding cloud/ (and "
                                        "edge/), or a model-hub id ORG/NAME[@REVISION]"),
    port: int = typer.Option(50051, help="TCP port; 0 = any free port"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0 / [::] for all: needs TLS and "
                                                "tokens or --tls-client-ca, or --insecure)"),
    max_sessions: int = typer.Option(256, help="sessions held at once"),
    max_sentences: int = typer.Option(0, help="sentences per session; 0 = the model's max positions"),
    idle_timeout: float = typer.Option(300.0, help="seconds of inactivity before a session is freed"),
    max_message_mb: float = typer.Option(0.0, help="largest message, MiB; 0 = 4, or what rebuilding a full "
                                                   "session needs if more"),
    kv_budget_mb: float = typer.Option(1024.0, help="KV cache memory for all sessions, MiB"),
    max_abs: float = typer.Option(1e4, help="largest |value| accepted in a sentence vector"),
    open_timeout: float = typer.Option(10.0, help="seconds a new stream has to send its Open"),
    max_pending_streams: int = typer.Option(64, help="streams waiting to send their Open; beyond it the "
                                                     "oldest of the token with the most is ended"),
    write_timeout: float = typer.Option(30.0, help="seconds a reply may wait for a client that does not read it; "
                                                   "then its stream ends"),
    owner_share: float = typer.Option(0.25, help="with authentication: the share of --max-sessions, --kv-budget-mb "
                                                 "and --max-pending-streams one token (or client certificate) may "
                                                 "hold; 1 = no quota"),
    max_connections: int = typer.Option(0, help="connections at once; 0 = the descriptor limit (raised to its "
                                                "hard limit) less a reserve"),
    max_streams_per_connection: int = typer.Option(0, help="concurrent RPCs on one connection; 0 = "
                                                           "--max-sessions + --max-pending-streams"),
    connection_idle: float = typer.Option(300.0, help="seconds a connection without RPCs stays open"),
    connection_age: float = typer.Option(3600.0, help="seconds before a connection is asked to go (GOAWAY; "
                                                      "clients reconnect)"),
    connection_grace: float = typer.Option(600.0, help="seconds the RPCs of an aged connection get before it is "
                                                       "closed"),
    health_watch_max: int = typer.Option(32, help="grpc.health.v1 Watch streams at once (no token needed)"),
    health_watch_per_peer: int = typer.Option(4, help="Watch streams per peer address; a new one ends its oldest"),
    health_watch_lifetime: float = typer.Option(60.0, help="seconds a Watch stream lasts (it ends OK; watch again)"),
    max_batch: int = typer.Option(64, help="steps per forward pass; 1 = no batching"),
    batch_wait_ms: float = typer.Option(0.0, help="wait this long for more steps before a forward pass"),
    device: str = typer.Option("auto", help="auto (cuda if available), cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("float32", help="compute dtype: float32, float16, bfloat16 (GPU)"),
    threads: int = typer.Option(0, help="torch CPU threads; 0 = default"),
    backend: str = typer.Option("auto", help="auto: on a CPU in float32, small steps (one session, or a few short "
                                             "ones) in ONNX Runtime, the rest in torch; torch: all in torch"),
    grace: float = typer.Option(10.0, help="shutdown: seconds open streams get to finish"),
    hand_back_idle: float = typer.Option(2.0, help="shutdown: a stream with no step for this many seconds (between "
                                                   "turns) is handed back to its client at once; 0 = never"),
    token_file: Optional[Path] = typer.Option(None, help=f"bearer tokens, one per line (also ${TOKENS_ENV} "
                                                         f"or ${TOKEN_ENV}, comma-separated)"),
    tls_cert: Optional[Path] = typer.Option(None, help="PEM certificate chain (TLS)"),
    tls_key: Optional[Path] = typer.Option(None, help="PEM private key (TLS)"),
    tls_client_ca: Optional[Path] = typer.Option(None, help="PEM CA certificates: clients must present a "
                                                            "certificate they signed (mutual TLS)"),
    insecure: bool = typer.Option(False, "--insecure", help="serve on a non-loopback --host without TLS or "
                                                            "authentication (logged as INSECURE)"),
    metrics_port: int = typer.Option(-1, help="Prometheus /metrics HTTP port; -1 = off"),
    metrics_host: str = typer.Option("127.0.0.1", help="address of /metrics (no auth, no TLS: loopback unless "
                                                       "the network is trusted)"),
    log_level: str = typer.Option("info", help="debug logs every forward pass"),
    speculate_max: int = typer.Option(16, help="sentence-level speculation: sentences a conversation may run "
                                               "ahead of its edge (what an edge asks for is capped at this); "
                                               "0 = off. Needs the edge bundle's graphs (--edge-bundle, or the "
                                               "edge/ beside the bundle)"),
    speculate_answer_max: int = typer.Option(64, help="sentences of one answer the cloud guesses at most"),
    edge_bundle: Optional[Path] = typer.Option(None, "--edge-bundle", help="an export's edge/ folder: the ONNX "
                                               "graphs speculation guesses with, the edge's own (default: the edge/ "
                                               "beside --bundle); its cloud weights sha256 must be --bundle's"),
) -> None:
    """Serve a cloud bundle until SIGINT/SIGTERM (then drain for --grace seconds; a second signal stops at once)."""
    from sllm.cloud.config import MIB, ServerConfig
    from sllm.cloud.jsonlog import log, setup_logging
    from sllm.runtime.manifest import BundleError

    if (bundle is None) == (model is None):
        _fail("pass --bundle DIR (a cloud bundle) or --model MODEL (a folder or model-hub id holding cloud/)")
    if model is not None:
        from sllm.runtime.models import ModelError, resolve_model

        try:
            bundle = resolve_model(model, ["cloud"], optional=["edge"]) / "cloud"
        except ModelError as e:
            _fail(str(e))
    setup_logging(log_level)
    config = ServerConfig(
        host=host, port=port, max_sessions=max_sessions, max_sentences=max_sentences, idle_timeout_s=idle_timeout,
        max_message_bytes=int(max_message_mb * MIB), kv_budget_bytes=int(kv_budget_mb * MIB), max_abs=max_abs,
        open_timeout_s=open_timeout, max_pending_streams=max_pending_streams, write_timeout_s=write_timeout,
        owner_share=owner_share, max_connections=max_connections, max_streams_per_connection=max_streams_per_connection,
        connection_idle_s=connection_idle, connection_age_s=connection_age, connection_grace_s=connection_grace,
        health_watch_max=health_watch_max, health_watch_per_peer=health_watch_per_peer,
        health_watch_lifetime_s=health_watch_lifetime,
        max_batch=max_batch, batch_wait_ms=batch_wait_ms, device=device, dtype=dtype,
        threads=threads, backend=backend, grace_s=grace, hand_back_idle_s=hand_back_idle, tokens=read_tokens(token_file),
        tls_cert=str(tls_cert or ""), tls_key=str(tls_key or ""), tls_client_ca=str(tls_client_ca or ""),
        insecure=insecure,
        metrics_port=metrics_port, metrics_host=metrics_host, log_steps=log_level.lower() == "debug",
        speculate_max=speculate_max, speculate_answer_max=speculate_answer_max, edge_dir=str(edge_bundle or ""))
    try:
        config.validate()
        from sllm.cloud.server import CloudServer

        server = CloudServer.from_bundle(bundle, config)
        server.start()
    except (BundleError, ValueError, OSError, RuntimeError) as e:
        _fail(str(e))
    signals = []

    def on_signal(signum, _frame):
        signals.append(signum)
        if len(signals) == 1:  # drain for --grace seconds
            log("signal", signal=signal.Signals(signum).name)
            threading.Thread(target=server.stop, name="sllm-shutdown", daemon=True).start()
            return
        # a second signal: cancel the open streams now; exit even if that hangs
        log("signal", 30, signal=signal.Signals(signum).name, message="second signal: stopping now")
        server.force_stop()
        timer = threading.Timer(FORCED_EXIT_S, _exit, args=(1,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not server.wait(0.1):
        pass
    # everything is stopped and logged: skip the interpreter's slow teardown of torch (seconds)
    _exit(1 if len(signals) > 1 else 0)


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


CLIENT_CERT_HELP = "this client's certificate (PEM; with --tls-key): for a server with mutual TLS"


def _channel(target: str, tls_ca: Optional[Path], tls_cert: Optional[Path], tls_key: Optional[Path],
             server_name: Optional[str], **kw):
    """The channel of `info` and `health`: TLS when a CA or a client certificate is given (mutual TLS with both
    --tls-cert and --tls-key), as the edge's."""
    from sllm.protos.client import make_channel

    if bool(tls_cert) != bool(tls_key):
        _fail("--tls-cert and --tls-key go together (this client's certificate and its key)")
    try:
        return make_channel(target, root_certificates=tls_ca.read_bytes() if tls_ca else None,
                            private_key=tls_key.read_bytes() if tls_key else None,
                            certificate_chain=tls_cert.read_bytes() if tls_cert else None,
                            server_name=server_name, **kw)
    except OSError as e:
        _fail(f"cannot read a TLS file: {e}")


@app.command()
def info(
    target: str = typer.Option("127.0.0.1:50051", help="host:port of a running server"),
    token_file: Optional[Path] = typer.Option(None, help=f"bearer token file (or ${TOKENS_ENV})"),
    tls_ca: Optional[Path] = typer.Option(None, help="CA / self-signed certificate to trust (TLS)"),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help=CLIENT_CERT_HELP),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="the private key of --tls-cert (PEM)"),
    server_name: Optional[str] = typer.Option(None, help="TLS name to check in the certificate"),
) -> None:
    """Print a server's model info and stats as JSON."""
    from google.protobuf.json_format import MessageToDict

    from sllm.protos.client import CloudClient, CloudError

    tokens = read_tokens(token_file)
    channel = _channel(target, tls_ca, tls_cert, tls_key, server_name)
    try:
        with CloudClient(target, tokens[0] if tokens else None, channel=channel) as c:
            out = {name: MessageToDict(msg, always_print_fields_with_no_presence=True, preserving_proto_field_name=True)
                   for name, msg in (("model", c.model_info(timeout=10)), ("stats", c.stats(timeout=10)))}
    except CloudError as e:
        _fail(str(e))
    typer.echo(json.dumps(out, indent=2))


@app.command()
def cluster(
    bundle: Path = typer.Option(..., "--bundle", help="cloud bundle directory, served by every replica"),
    replicas: int = typer.Option(2, min=1, help="sllm-cloud serve processes"),
    port: int = typer.Option(50051, help="the balancer's port on 127.0.0.1; 0 = any free port"),
    threads: int = typer.Option(0, help="torch CPU threads per replica; 0 = default"),
    grace: float = typer.Option(10.0, help="seconds a replica drains its open streams on SIGTERM"),
    restart: bool = typer.Option(True, "--restart/--no-restart", help="start a replica again when it exits"),
    token_file: Optional[Path] = typer.Option(None, help=f"bearer tokens shared by the replicas (also "
                                                         f"${TOKENS_ENV}); none = no auth (loopback)"),
    directory: Optional[Path] = typer.Option(None, "--dir", help="where the nginx config, pid file and logs go "
                                                                 "(default: a temporary folder, removed at the end)"),
) -> None:
    """Try replicas out: N `sllm-cloud serve` replicas and nginx in front of them on 127.0.0.1, with
    affinity on each conversation's key, health-driven routing and failover (docs/deploy/README.md).
    Ctrl-C drains and stops everything."""
    from sllm.cloud.cluster import Cluster, ClusterConfig, ClusterError

    def say(message: str) -> None:
        typer.echo(f"cluster: {message}", err=True)

    config = ClusterConfig(bundle=bundle, replicas=replicas, port=port, tokens=read_tokens(token_file), grace_s=grace,
                           threads=threads, restart=restart)
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        c = Cluster(config, directory, say=say)
        c.start()
    except (ClusterError, OSError) as e:
        _fail(str(e))
    typer.echo(f"listening on {c.address}")
    say(f"chat: edge-chat --server {c.address} --bundle <the edge bundle of {bundle}>"
        + (" --token <a token>" if config.tokens else ""))
    say(f"logs and the nginx config: {c.directory}; Ctrl-C stops everything")
    for r in c.replicas:
        say(f"replica {r.index}: pid {r.pid}, {r.address} (kill -TERM drains it, kill -KILL fails it over)")
    while not stop.wait(0.5):
        if not c.balancer.running():
            say("nginx has stopped; stopping the replicas")
            break
    say("stopping: replicas drain, then nginx")
    c.stop(grace=True)
    _exit(0)


@app.command()
def health(
    target: str = typer.Option("127.0.0.1:50051", help="host:port of a server (a replica, or a balancer)"),
    tls_ca: Optional[Path] = typer.Option(None, help="CA / self-signed certificate to trust (TLS)"),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help=CLIENT_CERT_HELP),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="the private key of --tls-cert (PEM)"),
    server_name: Optional[str] = typer.Option(None, help="TLS name to check in the certificate"),
    timeout: float = typer.Option(2.0, help="seconds to wait for the answer"),
) -> None:
    """Exit 0 when the server reports SERVING (grpc.health.v1, service sllm.v1.SentenceLM; no token
    needed), 1 when it does not (draining, model thread dead), 2 when it cannot be reached: for
    container health checks and Kubernetes exec probes (whose own gRPC probe has no TLS)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = _channel(target, tls_ca, tls_cert, tls_key, server_name, keepalive_s=0)
    try:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="sllm.v1.SentenceLM"), timeout=timeout).status
    except grpc.RpcError as e:
        typer.echo(f"{target}: unreachable ({e.code().name}: {e.details()})", err=True)
        raise typer.Exit(2) from None
    finally:
        channel.close()
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    typer.echo(f"{target}: {name}")
    raise typer.Exit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)


@app.command("random-bundle")
def random_bundle(
    out: Path = typer.Argument(..., help="directory to write the cloud bundle to"),
    d: int = typer.Option(256, help="sentence-vector size"),
    layers: int = typer.Option(4),
    heads: int = typer.Option(4),
    max_sentences: int = typer.Option(256),
    model_id: str = typer.Option("sllm-random", help="model id the edge must send"),
    seed: int = typer.Option(0),
) -> None:
    """A cloud bundle with random weights (benchmarks, load tests, demos of the wire)."""
    from sllm.modeling.cloud_bundle import write_random_cloud_bundle

    manifest = write_random_cloud_bundle(out, model_id=model_id, d=d, layers=layers, heads=heads,
                                   max_sentences=max_sentences, seed=seed)
    typer.echo(json.dumps({k: manifest[k] for k in ("model_id", "d_model", "num_layers", "max_sentences")}))


def main() -> None:
    run_command(app, "sllm-cloud")


if __name__ == "__main__":
    main()

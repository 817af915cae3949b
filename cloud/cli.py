"""`sllm-cloud`: serve a cloud bundle over gRPC, query a server, make a random bundle.

    sllm-cloud serve --bundle runs/export/cloud --port 50051
    sllm-cloud serve --bundle B --host 0.0.0.0 --token-file tokens.txt --tls-cert c.pem --tls-key k.pem
    sllm-cloud info --target 127.0.0.1:50051
    sllm-cloud random-bundle /tmp/cloud-d256 --d 256 --layers 4
"""
from __future__ import annotations

from runtime.roles import require_role

require_role("cloud", "sllm-cloud")  # before anything heavy: one line, not a traceback, in an edge install

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="The sllm cloud gRPC service.")

TOKENS_ENV = "SLLM_CLOUD_TOKENS"


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def read_tokens(token_file: Optional[Path]) -> list[str]:
    """Bearer tokens from a file (one per line, # comments) and/or $SLLM_CLOUD_TOKENS (comma-separated)."""
    tokens = []
    if token_file is not None:
        try:
            lines = token_file.read_text().splitlines()
        except OSError as e:
            _fail(f"cannot read the token file: {e}")
        tokens += [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not tokens:
            _fail(f"{token_file} holds no token")
    tokens += [t.strip() for t in os.environ.get(TOKENS_ENV, "").split(",") if t.strip()]
    return tokens


@app.command()
def serve(
    bundle: Path = typer.Option(..., "--bundle", help="cloud bundle directory (export output)"),
    port: int = typer.Option(50051, help="TCP port; 0 = any free port"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0 / [::] for all)"),
    max_sessions: int = typer.Option(256, help="sessions held at once"),
    max_sentences: int = typer.Option(0, help="sentences per session; 0 = the model's max positions"),
    idle_timeout: float = typer.Option(300.0, help="seconds of inactivity before a session is freed"),
    max_message_mb: float = typer.Option(4.0, help="largest request message, MiB"),
    kv_budget_mb: float = typer.Option(1024.0, help="KV cache memory for all sessions, MiB"),
    max_abs: float = typer.Option(1e4, help="largest |value| accepted in a sentence vector"),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="batch concurrent sessions' steps"),
    max_batch: int = typer.Option(64, help="steps per forward pass"),
    batch_wait_ms: float = typer.Option(0.0, help="wait this long for more steps before a forward pass"),
    device: str = typer.Option("auto", help="auto (cuda if available), cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("float32", help="compute dtype: float32, float16, bfloat16 (GPU)"),
    threads: int = typer.Option(0, help="torch CPU threads; 0 = default"),
    grace: float = typer.Option(10.0, help="shutdown: seconds open streams get to finish"),
    token_file: Optional[Path] = typer.Option(None, help=f"bearer tokens, one per line (also ${TOKENS_ENV})"),
    tls_cert: Optional[Path] = typer.Option(None, help="PEM certificate chain (TLS)"),
    tls_key: Optional[Path] = typer.Option(None, help="PEM private key (TLS)"),
    metrics_port: int = typer.Option(-1, help="Prometheus /metrics HTTP port; -1 = off"),
    log_level: str = typer.Option("info", help="debug logs every forward pass"),
) -> None:
    """Serve a cloud bundle until SIGINT/SIGTERM (then drain for --grace seconds)."""
    from cloud.config import MIB, ServerConfig
    from cloud.jsonlog import log, setup_logging
    from runtime.manifest import BundleError

    setup_logging(log_level)
    config = ServerConfig(
        host=host, port=port, max_sessions=max_sessions, max_sentences=max_sentences, idle_timeout_s=idle_timeout,
        max_message_bytes=int(max_message_mb * MIB), kv_budget_bytes=int(kv_budget_mb * MIB), max_abs=max_abs,
        batching=batching, max_batch=max_batch, batch_wait_ms=batch_wait_ms, device=device, dtype=dtype,
        threads=threads, grace_s=grace, tokens=read_tokens(token_file), tls_cert=str(tls_cert or ""),
        tls_key=str(tls_key or ""), metrics_port=metrics_port, log_steps=log_level.lower() == "debug")
    try:
        config.validate()
        from cloud.server import CloudServer

        server = CloudServer.from_bundle(bundle, config)
        server.start()
    except (BundleError, ValueError, OSError, RuntimeError) as e:
        _fail(str(e))
    if not config.tokens:
        log("no_auth", 30, message="no bearer tokens configured: any client may connect")

    def on_signal(signum, _frame):
        log("signal", signal=signal.Signals(signum).name)
        threading.Thread(target=server.stop, name="sllm-shutdown", daemon=True).start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not server.wait(0.5):
        pass
    # everything is stopped and logged: skip the interpreter's slow teardown of torch (seconds)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command()
def info(
    target: str = typer.Option("127.0.0.1:50051", help="host:port of a running server"),
    token_file: Optional[Path] = typer.Option(None, help=f"bearer token file (or ${TOKENS_ENV})"),
    tls_ca: Optional[Path] = typer.Option(None, help="CA / self-signed certificate to trust (TLS)"),
    server_name: Optional[str] = typer.Option(None, help="TLS name to check in the certificate"),
) -> None:
    """Print a server's model info and stats as JSON."""
    from google.protobuf.json_format import MessageToDict

    from protos.client import CloudClient, CloudError

    tokens = read_tokens(token_file)
    try:
        with CloudClient(target, tokens[0] if tokens else None,
                         root_certificates=tls_ca.read_bytes() if tls_ca else None, server_name=server_name) as c:
            out = {name: MessageToDict(msg, always_print_fields_with_no_presence=True, preserving_proto_field_name=True)
                   for name, msg in (("model", c.model_info(timeout=10)), ("stats", c.stats(timeout=10)))}
    except CloudError as e:
        _fail(str(e))
    typer.echo(json.dumps(out, indent=2))


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
    from modeling.cloud_bundle import write_random_cloud_bundle

    manifest = write_random_cloud_bundle(out, model_id=model_id, d=d, layers=layers, heads=heads,
                                   max_sentences=max_sentences, seed=seed)
    typer.echo(json.dumps({k: manifest[k] for k in ("model_id", "d_model", "num_layers", "max_sentences")}))


if __name__ == "__main__":
    app()

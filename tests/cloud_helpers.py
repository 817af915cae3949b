"""Cloud test helpers: in-process servers, server processes' log events, the torch reference of a step,
raw Converse streams. A server in its own process comes from the one launcher
(sllm.runtime.server_process.ServerProcess), as for edge-chat --local, the cluster and the benches."""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
import torch

from sllm.cloud.config import ServerConfig
from sllm.cloud.server import CloudServer
from sllm.modeling.opt_graft import STOP, GraftedOPT
from sllm.protos.errors import reason_of
from sllm.protos.v1 import sllm_pb2 as pb

D = 32  # the random cloud model of the `cloud_bundle` fixture (tests/conftest.py)
MODEL_ID = "sllm-test-model"


@contextlib.contextmanager
def running_server(bundle_dir: str | Path, **config) -> Iterator[CloudServer]:
    """A started server on 127.0.0.1 (port 0 unless given), stopped (grace 0) on exit."""
    config.setdefault("port", 0)
    server = CloudServer.from_bundle(bundle_dir, ServerConfig(**config))
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=0)


class Events:
    """A server process's JSON log entries as they come (ServerProcess(on_event=Events())), to wait for one."""

    def __init__(self):
        self.entries: list[dict] = []
        self._cond = threading.Condition()

    def __call__(self, entry: dict) -> None:
        with self._cond:
            self.entries.append(entry)
            self._cond.notify_all()

    def names(self) -> list[str]:
        with self._cond:
            return [e.get("event") for e in self.entries]

    def wait_for(self, event: str, timeout: float = 90.0) -> dict:
        """The first entry of `event` (waiting up to `timeout` seconds for it)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = next((e for e in self.entries if e.get("event") == event), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {event!r} log line; got {[e.get('event') for e in self.entries]}")
                self._cond.wait(left)


def reference_outputs(model: GraftedOPT, vectors) -> tuple:
    """The torch reference: one full forward over all `vectors` [N, d] ->
    (hidden [N, d], P(stop) [N], stop decision [N]) as numpy."""
    with torch.no_grad():
        h, logits = model(torch.as_tensor(np.asarray(vectors, dtype=np.float32))[None])
    p = logits[0].float().softmax(-1)[:, STOP].numpy()
    return h[0].float().numpy(), p, (logits[0].argmax(-1) == STOP).numpy()


def converse_raw(target: str, messages: list, metadata=(), timeout: float = 10.0, raw: bool = False,
                 credentials=None, with_reason: bool = False) -> tuple:
    """Send `messages` on one Converse stream, then half-close. Returns (replies, status code, details),
    and with_reason the ErrorReason of the status (protos.errors) last. With raw=True, `messages` are
    bytes sent as they are."""
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    try:
        call = channel.stream_stream(
            "/sllm.v1.SentenceLM/Converse",
            request_serializer=None if raw else pb.ClientMessage.SerializeToString,
            response_deserializer=pb.ServerMessage.FromString)(iter(messages), timeout=timeout, metadata=metadata)
        replies = []
        try:
            for reply in call:
                replies.append(reply)
        except grpc.RpcError as e:
            call = e
        out = (replies, call.code(), call.details() or "")
        return (*out, reason_of(call.trailing_metadata())) if with_reason else out
    finally:
        channel.close()


def self_signed_cert(tmp_path):
    """A self-signed certificate for localhost / 127.0.0.1: `cryptography` when installed, else openssl."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is available")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=30)
        return cert, key
    pkey = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    crt = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pkey.public_key())
           .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
           .not_valid_after(now + datetime.timedelta(days=1))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
           .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
           .sign(pkey, hashes.SHA256()))
    cert.write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(pkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return cert, key


def _openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not available")
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def make_ca(directory: Path, name: str = "test-ca") -> tuple[Path, Path]:
    """A throwaway certificate authority (openssl CLI): (ca.pem, ca.key) in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def issue_cert(directory: Path, ca: tuple[Path, Path], name: str) -> tuple[Path, Path]:
    """A certificate signed by `ca` (from make_ca) for CN=name, valid for localhost / 127.0.0.1 as a
    server and as a client (mutual TLS): (name.pem, name.key) in `directory`."""
    directory = Path(directory)
    cert, key, csr, ext = (directory / f"{name}.pem", directory / f"{name}.key", directory / f"{name}.csr",
                           directory / f"{name}.ext")
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
             "-out", str(csr), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-out", str(cert), "-days", "1", "-extfile", str(ext))
    return cert, key


@contextlib.contextmanager
def captured_logs() -> Iterator[list[dict]]:
    """The server's JSON-log entries (event + fields) emitted inside the block, at info level and up,
    whatever handlers the `sllm.cloud` logger has (other tests may have set it up)."""
    import logging

    from sllm.cloud.jsonlog import get_logger

    entries: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record):
            entries.append({"event": record.getMessage(), "level": record.levelname.lower(),
                            **getattr(record, "fields", {})})

    logger, handler = get_logger(), Collect()
    level = logger.level
    logger.addHandler(handler)
    if not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.INFO)
    try:
        yield entries
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)

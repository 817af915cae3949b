"""Safe to expose (issue 14), against real servers on 127.0.0.1: streams that never open cannot
lock anyone out; no exposed address without TLS and authentication; mutual TLS; one token
variable name; metrics on loopback; the served weights' hash; a dead model thread says
NOT_SERVING; a full-history rebuild fits the message limit; unauthenticated callers get
UNAUTHENTICATED for any method, logged at a bounded rate; a second signal stops at once."""
import hashlib
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from cloud_helpers import (MODEL_ID, D, Events, captured_logs, converse_raw, issue_cert, make_ca, running_server,
                           self_signed_cert)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from sllm.cloud.cli import app, read_tokens
from sllm.cloud.config import ServerConfig, is_loopback
from sllm.cloud.jsonlog import LogRateLimit
from sllm.cloud.server import CloudServer, full_history_bytes
from sllm.modeling.cloud_bundle import load_cloud_bundle, write_random_cloud_bundle
from sllm.protos.client import CloudClient, CloudError
from sllm.runtime.server_process import TOKEN_ENV, TOKENS_ENV, ServerProcess

C = grpc.StatusCode
TOKEN = "exposure-token"
ROOT = Path(__file__).resolve().parents[1]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _vec(n=1, seed=0):
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def _health(target, service="", timeout=1.0):
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                    timeout=timeout).status


def _until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


class _SilentStreams:
    """`n` Converse streams (over a few channels) that send headers and then nothing at all."""

    def __init__(self, target, n, metadata=(), channels=4):
        self.release = threading.Event()
        self.channels = [grpc.insecure_channel(target) for _ in range(channels)]
        self.calls = []
        for i in range(n):
            method = self.channels[i % channels].stream_stream("/sllm.v1.SentenceLM/Converse")
            self.calls.append(method(self._nothing(), metadata=metadata, timeout=60))

    def _nothing(self):
        self.release.wait()
        return
        yield

    def close(self):
        for call in self.calls:
            call.cancel()
        self.release.set()
        for ch in self.channels:
            ch.close()


# -- 1. streams that never send their first message ------------------------------------------------
def test_300_silent_streams_leave_health_and_new_conversations_answering(cloud_bundle):
    with running_server(cloud_bundle, tokens=[TOKEN], max_sessions=16, owner_share=1.0,
                        max_streams_per_connection=400) as srv:  # one tenant; all 300 reach the service
        target = f"127.0.0.1:{srv.port}"
        with CloudClient(target, token=TOKEN) as c:
            busy = [c.conversation(MODEL_ID, D) for _ in range(8)]  # normal load: conversations attached
            for conv in busy:
                conv.append(_vec(2))
            silent = _SilentStreams(target, 300, metadata=(("authorization", f"Bearer {TOKEN}"),))
            try:
                pending = srv.service.pending
                assert _until(lambda: pending.evicted_total + len(pending.streams) >= 300)
                t0 = time.monotonic()
                assert _health(target) == SERVING and _health(target, "sllm.v1.SentenceLM") == SERVING
                assert c.model_info(timeout=1.0).model_id == MODEL_ID
                with c.conversation(MODEL_ID, D, timeout=1.0) as conv:
                    assert conv.append(_vec(3, seed=1)).past_length == 3
                assert time.monotonic() - t0 < 1.0
                # the silent ones: never more than the limit held, the others ended with a clear status
                limit = srv.config.max_pending_streams
                assert len(pending.streams) <= limit and pending.evicted_total >= 300 - limit
                assert _until(lambda: sum(call.done() for call in silent.calls) >= 300 - limit, 5)
                ended = [call for call in silent.calls if call.done()]
                assert {(call.code(), "waiting to send their Open" in call.details()) for call in ended} == \
                    {(C.RESOURCE_EXHAUSTED, True)}
                for conv in busy:  # the conversations under way were not disturbed
                    assert conv.append(_vec(1, seed=2)).past_length == 3
                    conv.close()
            finally:
                silent.close()
        assert _until(lambda: not srv.service.pending.streams and not srv.store.stats()["sessions"], 5)


def test_a_stream_must_open_within_the_open_timeout(cloud_bundle):
    with running_server(cloud_bundle, open_timeout_s=0.3) as srv:
        target = f"127.0.0.1:{srv.port}"
        silent = _SilentStreams(target, 1, channels=1)
        try:
            t0 = time.monotonic()
            assert silent.calls[0].code() == C.DEADLINE_EXCEEDED
            assert 0.25 < time.monotonic() - t0 < 3
            assert "no Open within 0.3 s" in silent.calls[0].details()
        finally:
            silent.close()
        with CloudClient(target) as c:  # a client that opens at once is not affected
            with c.conversation(MODEL_ID, D) as conv:
                conv.append(_vec(2))
            assert c.stats().errors_by_code["DEADLINE_EXCEEDED"] == 1


# -- 2. exposure: TLS + authentication, one token variable, metrics on loopback, mutual TLS --------
def test_an_exposed_address_needs_tls_and_authentication(tmp_path, monkeypatch):
    for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"):
        assert is_loopback(host)
        ServerConfig(host=host).validate()  # loopback without tokens or TLS: fine (local development)
    for host in ("0.0.0.0", "::", "[::]", "10.0.0.5", "gpu-box.example.com", ""):
        assert not is_loopback(host)
    tls = dict(tls_cert="c.pem", tls_key="k.pem")
    for kw, missing in (({}, "without TLS (--tls-cert, --tls-key) and authentication"),
                        ({"tokens": ["t"]}, "without TLS (--tls-cert, --tls-key):"),
                        (tls, "without authentication (--token-file / $SLLM_CLOUD_TOKENS, or --tls-client-ca)")):
        with pytest.raises(ValueError, match=re.escape(missing)):
            ServerConfig(host="0.0.0.0", **kw).validate()
    ServerConfig(host="0.0.0.0", tokens=["t"], **tls).validate()
    ServerConfig(host="0.0.0.0", tls_client_ca="ca.pem", **tls).validate()  # client certificates authenticate
    ServerConfig(host="0.0.0.0", insecure=True).validate()  # explicitly asked for (logged as INSECURE)
    with pytest.raises(ValueError, match="mutual TLS.*needs TLS"):
        ServerConfig(tls_client_ca="ca.pem").validate()
    assert ServerConfig().metrics_host == "127.0.0.1"  # the metrics endpoint stays local unless chosen

    # the command refuses before loading anything; the edge's variable name turns auth on just the same
    write_random_cloud_bundle(tmp_path / "b", d=16, layers=1, heads=2)
    monkeypatch.delenv("SLLM_CLOUD_TOKENS", raising=False)
    monkeypatch.delenv("SLLM_CLOUD_TOKEN", raising=False)
    r = CliRunner().invoke(app, ["serve", "--bundle", str(tmp_path / "b"), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "refusing to listen on 0.0.0.0" in r.output and "--insecure" in r.output
    assert read_tokens(None) == []
    monkeypatch.setenv("SLLM_CLOUD_TOKEN", "edge-name")
    assert read_tokens(None) == ["edge-name"]
    monkeypatch.setenv("SLLM_CLOUD_TOKENS", "a,b,edge-name")
    (tmp_path / "tokens").write_text("file-token\n")
    assert read_tokens(tmp_path / "tokens") == ["file-token", "a", "b", "edge-name"]


def test_mutual_tls_requires_a_client_certificate_of_the_client_ca(cloud_bundle, tmp_path):
    server_cert, server_key = self_signed_cert(tmp_path)
    clients_ca = make_ca(tmp_path / "ca", "clients-ca")
    alice, bob = issue_cert(tmp_path, clients_ca, "alice"), issue_cert(tmp_path, clients_ca, "bob")
    stranger = issue_cert(tmp_path, make_ca(tmp_path / "other-ca", "other-ca"), "stranger")
    root = server_cert.read_bytes()

    def client(target, pair=None):
        key, chain = (pair[1].read_bytes(), pair[0].read_bytes()) if pair else (None, None)
        creds = grpc.ssl_channel_credentials(root, private_key=key, certificate_chain=chain)
        return CloudClient(target, channel=grpc.secure_channel(target, creds))

    with running_server(cloud_bundle, tls_cert=str(server_cert), tls_key=str(server_key),
                        tls_client_ca=str(clients_ca[0])) as srv:
        target = f"127.0.0.1:{srv.port}"
        with client(target, alice) as c:
            assert c.model_info(timeout=5).model_id == MODEL_ID
            conv = c.conversation(MODEL_ID, D)
            conv.append(_vec(2))
            conv.close(keep=True)
        for pair in (None, stranger):  # no certificate, or one the client CA did not sign: no handshake
            with client(target, pair) as c, pytest.raises(CloudError) as e:
                c.model_info(timeout=5)
            assert e.value.code == C.UNAVAILABLE
        # the certificate is the caller's identity: another client's certificate cannot resume the session
        with client(target, bob) as c, pytest.raises(CloudError) as e:
            c.conversation(MODEL_ID, D, session_id=conv.session_id)
        assert e.value.code == C.NOT_FOUND and "unknown session" in e.value.details
        with client(target, alice) as c, c.conversation(MODEL_ID, D, session_id=conv.session_id) as again:
            assert again.resumed and again.past_length == 2


# -- 4. the served weights' hash -----------------------------------------------------------------
def test_model_info_reports_the_served_weights_sha256(cloud_bundle):
    digest = hashlib.sha256((cloud_bundle / "cloud.safetensors").read_bytes()).hexdigest()
    manifest = json.loads((cloud_bundle / "manifest.json").read_text())
    assert manifest["files"]["cloud.safetensors"] == digest
    with running_server(cloud_bundle) as srv, CloudClient(f"127.0.0.1:{srv.port}") as c:
        assert c.model_info().weights_sha256 == digest
    # a server built from a model in memory has no file to hash: it reports "" (documented)
    model = load_cloud_bundle(cloud_bundle)[0]
    with CloudServer(model, MODEL_ID, ServerConfig(port=0)) as srv, CloudClient(f"127.0.0.1:{srv.port}") as c:
        assert c.model_info().weights_sha256 == ""


# -- 5. a dead model thread, message size, unauthenticated calls, public API, a second signal ------
@pytest.mark.parametrize("death", [SystemExit, torch.AcceleratorError])
def test_a_dead_model_thread_means_not_serving_and_unavailable(cloud_bundle, death):
    with running_server(cloud_bundle) as srv, CloudClient(f"127.0.0.1:{srv.port}") as c:
        target = f"127.0.0.1:{srv.port}"
        conv = c.conversation(MODEL_ID, D)
        conv.append(_vec(2))

        def broken(*_a, **_k):  # SystemExit: escapes the per-job handling; AcceleratorError: a poisoned device
            raise death("CUDA error: an illegal memory access was encountered")

        srv.engine.forward = broken
        t0 = time.monotonic()
        with pytest.raises(CloudError) as e:
            conv.append(_vec(1))
        assert e.value.code == C.UNAVAILABLE and "model thread" in e.value.details
        assert time.monotonic() - t0 < 0.9  # failed by the batcher at once, not found by a poll
        assert _until(lambda: _health(target) == NOT_SERVING, 5)
        assert _health(target, "sllm.v1.SentenceLM") == NOT_SERVING
        for call in (lambda: c.conversation(MODEL_ID, D), c.model_info):
            with pytest.raises(CloudError) as e:
                call()
            assert e.value.code == C.UNAVAILABLE and "NOT_SERVING" in e.value.details
        assert c.stats().sessions == 0  # GetStats still answers, for whoever investigates


def test_a_full_history_rebuild_fits_the_message_limit(cloud_bundle, tmp_path):
    need = full_history_bytes(MODEL_ID, D, 64)  # the bundle: d=32, 64 sentences
    with pytest.raises(ValueError) as e:
        CloudServer.from_bundle(cloud_bundle, ServerConfig(port=0, max_message_bytes=need - 1))
    assert "--max-message-mb" in str(e.value) and "--max-sentences 0 (the model's maximum, 64)" in str(e.value)
    r = CliRunner().invoke(app, ["serve", "--bundle", str(cloud_bundle), "--max-message-mb", "0.001",
                                 "--max-sentences", "64"])
    assert r.exit_code == 2 and "too small for --max-sentences 64" in r.output
    # at exactly the smallest limit allowed, the largest rebuild (longest id too) goes through
    with running_server(cloud_bundle, max_message_bytes=need) as srv, CloudClient(f"127.0.0.1:{srv.port}") as c:
        assert c.model_info().max_message_bytes == need
        with c.conversation(MODEL_ID, D, session_id="x" * 128, history=_vec(64), keep_on_disconnect=True) as conv:
            assert conv.past_length == 64 and conv.remaining_sentences == 0
    with running_server(cloud_bundle) as srv, CloudClient(f"127.0.0.1:{srv.port}") as c:  # automatic
        assert c.model_info().max_message_bytes == 4 << 20


def test_unauthenticated_callers_get_unauthenticated_for_any_method(cloud_bundle):
    with running_server(cloud_bundle, tokens=[TOKEN]) as srv, captured_logs() as logs:
        target = f"127.0.0.1:{srv.port}"
        good = (("authorization", f"Bearer {TOKEN}"),)
        with grpc.insecure_channel(target) as ch:
            for name in ("/sllm.v1.SentenceLM/Nope", "/no.such.Service/Method", "/sllm.v1.SentenceLM/GetStats"):
                for streaming in (False, True):
                    with pytest.raises(grpc.RpcError) as e:
                        if streaming:
                            list(ch.stream_stream(name)(iter([b""]), timeout=5))
                        else:
                            ch.unary_unary(name)(b"", timeout=5)
                    assert e.value.code() == C.UNAUTHENTICATED, (name, streaming, e.value.code())
            with pytest.raises(grpc.RpcError) as e:  # with a valid token, an unknown method is just unknown
                ch.unary_unary("/sllm.v1.SentenceLM/Nope")(b"", timeout=5, metadata=good)
            assert e.value.code() == C.UNIMPLEMENTED
        assert _health(target) == SERVING  # health checking needs no token
        for _ in range(14):
            assert converse_raw(target, [], metadata=(("authorization", "Bearer wrong"),))[1] == C.UNAUTHENTICATED
        with CloudClient(target, token=TOKEN) as c:
            assert c.stats().errors_by_code["UNAUTHENTICATED"] == 20
    lines = [e for e in logs if e["event"] == "unauthenticated"]
    assert len(lines) == 1 and lines[0]["level"] == "warning" and lines[0]["peer"].startswith("ipv4:127.0.0.1")


def test_log_rate_limit_counts_what_it_suppressed():
    limit = LogRateLimit(0.05)
    assert limit.take() == 0
    assert [limit.take() for _ in range(3)] == [None] * 3
    time.sleep(0.06)
    assert limit.take() == 3 and limit.take() is None


def test_the_cloud_uses_no_private_grpc_api():
    """Streams are ended by their own handler (context.abort), never through grpc internals."""
    for path in sorted((ROOT / "cloud").glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not re.search(r"\b(context|call|server|rpc)\._[a-z]|_rpc_event|grpc\._", line), \
                f"{path.name}:{n}: {line.strip()}"


def test_a_second_signal_stops_the_server_at_once(tmp_path):
    """One SIGTERM drains (a stream left open holds it for --grace); a second one ends it now.
    The process also shows the edge's token variable turning auth on and /metrics on loopback."""
    write_random_cloud_bundle(tmp_path / "bundle", model_id="sllm-sig", d=16, layers=1, heads=2)
    env = {k: v for k, v in os.environ.items() if k != TOKENS_ENV}
    events = Events()
    server = ServerProcess.serve(tmp_path / "bundle", "--grace", "60", "--metrics-port", "0", threads=1,
                                 env={**env, TOKEN_ENV: TOKEN}, on_event=events, startup_timeout=90)
    with server:
        start = server.info
        assert start["auth"] and start["metrics_address"].startswith("127.0.0.1:")
        with CloudClient(server.address) as c, pytest.raises(CloudError, match="UNAUTHENTICATED"):
            c.model_info(timeout=10)
        with CloudClient(server.address, token=TOKEN) as c:
            conv = c.conversation("sllm-sig", 16)  # left open: holds a graceful stop for 60 s
            conv.append(np.ones((2, 16), np.float32))
            server.send(signal.SIGTERM)
            events.wait_for("server_draining")
            t0 = time.monotonic()
            server.send(signal.SIGTERM)
            assert server.wait(timeout=10) == 1  # forced: not a clean drain
            assert time.monotonic() - t0 < 5
            assert events.wait_for("server_stop")["forced"] is True
            with pytest.raises(CloudError):
                conv.append(np.ones((1, 16), np.float32))


def test_a_token_flooding_silent_streams_ends_its_own_first():
    """When the streams waiting to open are at the limit, the one ended is the oldest of the token
    with the most of them: one token's flood does not push out another token's stream."""
    from sllm.cloud.service import PendingStreams

    class FakeStream:
        def __init__(self, owner):
            self.owner, self.ended = owner, None

        def end(self, error):
            self.ended = error.code

    pending = PendingStreams(limit=4)
    flood = [FakeStream("A") for _ in range(3)]
    other = FakeStream("B")
    for s in (flood[0], other, flood[1], flood[2]):
        pending.enter(s)
    late = [FakeStream("A") for _ in range(5)]
    for s in late:
        pending.enter(s)
    assert other.ended is None and list(pending.streams) == [other, *late[-3:]]
    assert [s.ended for s in flood + late[:2]] == [C.RESOURCE_EXHAUSTED] * 5 and pending.evicted_total == 5
    pending.leave(other)
    pending.leave(other)  # twice: harmless
    assert dict(pending.by_owner) == {"A": 3}

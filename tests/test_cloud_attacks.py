"""Hostile load against a real server on 127.0.0.1, each attack with small limits and a few seconds:
unauthenticated health Watch floods, clients that never read their replies, one token holding
everything, idle and preface-only connections, rollback cycles against the KV budget, and the
`health` / `info` commands against a mutual-TLS server. After each attack, health, GetModelInfo and
a new conversation must answer within 2 s and the process's memory must stay within a stated bound."""
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from cloud_helpers import MODEL_ID, D, issue_cert, make_ca, running_server, self_signed_cert
from grpc_health.v1 import health_pb2, health_pb2_grpc
from h2_raw import RawConnection, RawConnections
from typer.testing import CliRunner

from sllm.cloud.cli import app
from sllm.cloud.limits import FD_RESERVE, connection_limit
from sllm.cloud.metrics import prometheus_text
from sllm.modeling.cloud_bundle import write_random_cloud_bundle
from sllm.modeling.opt_block import KVSlot
from sllm.protos.client import CloudClient, CloudError
from sllm.protos.v1 import sllm_pb2 as pb

C = grpc.StatusCode
TOKENS = ["attack-token-a", "attack-token-b"]
AUTH = [(("authorization", f"Bearer {t}"),) for t in TOKENS]
WATCH = "/grpc.health.v1.Health/Watch"
CONVERSE = "/sllm.v1.SentenceLM/Converse"
OPEN = pb.ClientMessage(open=pb.Open(model_id=MODEL_ID, dim=D)).SerializeToString()
MIB = 1 << 20


def _vec(n=1, seed=0, d=D):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.02)
    return cond()


def _still_answering(port: int, token: str | None = TOKENS[0], within: float = 2.0) -> float:
    """Health, GetModelInfo and a whole new conversation, on a fresh connection; the seconds they took."""
    target = f"127.0.0.1:{port}"
    t0 = time.monotonic()
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="sllm.v1.SentenceLM"),
                                                    timeout=within).status == health_pb2.HealthCheckResponse.SERVING
        with CloudClient(target, token, channel=ch) as c:
            assert c.model_info(timeout=within).model_id == MODEL_ID
            with c.conversation(MODEL_ID, D, timeout=within) as conv:
                assert conv.append(_vec(2)).past_length == 2
    took = time.monotonic() - t0
    assert took < within, f"took {took:.2f} s"
    return took


def _fresh_channel(port):
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])


# -- 1. health cannot be weaponised ---------------------------------------------------------------
def test_unauthenticated_watch_floods_leave_health_and_work_answering(cloud_bundle):
    with running_server(cloud_bundle, tokens=TOKENS, health_watch_max=8, health_watch_per_peer=3,
                        health_watch_lifetime_s=30) as srv:
        health = srv.health
        rss0 = _rss()
        channels = [_fresh_channel(srv.port) for _ in range(4)]
        calls = []
        try:
            for i in range(200):  # many streams, no token, never read beyond the first answer
                stub = health_pb2_grpc.HealthStub(channels[i % 4])
                calls.append(stub.Watch(health_pb2.HealthCheckRequest(service="sllm.v1.SentenceLM"), timeout=30))
                assert next(calls[-1]).status == health_pb2.HealthCheckResponse.SERVING
            huge = "x" * (3 << 20)  # 3 MiB service names, as many as fit the message limit
            for i in range(16):
                calls.append(health_pb2_grpc.HealthStub(channels[i % 4]).Watch(
                    health_pb2.HealthCheckRequest(service=huge), timeout=30))
            assert _until(lambda: sum(c.done() for c in calls) >= len(calls) - 8, 15)
            took = _still_answering(srv.port)
            assert len(health.watches) <= 8 and max(health.by_peer.values()) <= 3  # all from 127.0.0.1
            stats = srv.service.stats()
            assert stats["health_watches"] <= 8 and stats["health_watches_ended_total"] >= 190
            codes = {c.code() for c in calls if c.done()}
            assert codes <= {C.RESOURCE_EXHAUSTED, C.INVALID_ARGUMENT}, codes
            assert sum(c.code() == C.INVALID_ARGUMENT for c in calls[200:]) == 16  # the huge names
            grown = _rss() - rss0
            print(f"watch flood: answered in {took:.3f} s; RSS +{grown / MIB:.1f} MiB")
            assert grown < 150 * MIB  # was +17 MiB per huge-name stream: 16 of them would be +270 MiB
            # a re-watching prober always gets in: its new stream ends its own oldest
            w = health_pb2_grpc.HealthStub(channels[0]).Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert next(w).status == health_pb2.HealthCheckResponse.SERVING
            w.cancel()
        finally:
            for c in calls:
                c.cancel()
            for ch in channels:
                ch.close()


def test_a_watch_ends_after_its_lifetime_and_follows_status(cloud_bundle):
    with running_server(cloud_bundle, health_watch_lifetime_s=0.5) as srv, _fresh_channel(srv.port) as ch:
        t0 = time.monotonic()
        call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert [r.status for r in call] == [health_pb2.HealthCheckResponse.SERVING]
        assert call.code() == C.OK and 0.4 < time.monotonic() - t0 < 3
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="y" * 300), timeout=5)
        assert e.value.code() == C.INVALID_ARGUMENT


# -- 2. every RPC slot is reclaimable ---------------------------------------------------------------
def test_768_never_reading_streams_end_and_leave_the_server_answering(cloud_bundle):
    """Raw HTTP/2 connections whose receive window is 0: the server can never deliver a reply. Reaped
    sessions (idle timeout) and replies nobody takes (write timeout) both end their stream's handler."""
    with running_server(cloud_bundle, tokens=TOKENS, max_sessions=32, max_pending_streams=16, owner_share=1.0,
                        idle_timeout_s=0.3, write_timeout_s=0.5) as srv, RawConnections() as rc:
        rss0 = _rss()
        ended = lambda: srv.service.stats()["errors_by_code"].get("RESOURCE_EXHAUSTED", 0)  # noqa: E731
        for wave in (1, 2):  # 2 x 8 connections x 48 streams = 768; the second wave finds the slots free again
            for _ in range(8):
                conn = rc.add(RawConnection(srv.port))
                conn.handshake(window=0)
                for _ in range(48):
                    conn.open_stream(CONVERSE, [OPEN], metadata=AUTH[0])
            # the attacker keeps every connection open; the handlers must end anyway, each with a status:
            # refused (server full), ended waiting to open, or ended for not reading (write or idle timeout)
            assert _until(lambda: ended() == 384 * wave and srv.service.streams_open == 0, 20), \
                (wave, ended(), srv.service.streams_open, srv.store.stats())
        assert srv.store.stats()["sessions"] == 0 and srv.service.stats()["sessions_opened_total"] >= 64
        took = _still_answering(srv.port, TOKENS[1])
        grown = _rss() - rss0
        print(f"768 never-reading streams: answered in {took:.3f} s; RSS +{grown / MIB:.1f} MiB")
        assert grown < 100 * MIB


# -- 3. quotas per credential -----------------------------------------------------------------------
def test_one_token_at_its_quota_cannot_keep_another_out(cloud_bundle):
    with running_server(cloud_bundle, tokens=TOKENS, max_sessions=8, owner_share=0.5,
                        kv_budget_bytes=64 * 512 * 4) as srv:  # 4 full sessions (d=32, 2 layers: 512 B a sentence)
        target = f"127.0.0.1:{srv.port}"
        with CloudClient(target, TOKENS[0]) as a, CloudClient(target, TOKENS[1]) as b:
            held = [a.conversation(MODEL_ID, D) for _ in range(4)]
            for conv in held:
                conv.append(_vec(1))
            with pytest.raises(CloudError) as e:  # its quota, not the server's limit
                a.conversation(MODEL_ID, D)
            assert e.value.code == C.RESOURCE_EXHAUSTED and "quota of 4 sessions" in e.value.details
            others = [b.conversation(MODEL_ID, D) for _ in range(4)]  # the other token is unaffected
            for conv in others:
                assert conv.append(_vec(2)).past_length == 2
            # its KV quota (half the budget: 128 sentences): a's sessions fill it, b's appends still go
            held[0].append(_vec(60))
            held[1].append(_vec(60))
            with pytest.raises(CloudError) as e:
                held[2].append(_vec(20))
            assert e.value.code == C.RESOURCE_EXHAUSTED and "KV cache quota" in e.value.details
            assert others[0].append(_vec(30)).past_length == 32
            by_owner = srv.service.stats()["by_owner"]
            assert sorted(u["sessions"] for u in by_owner.values()) == [3, 4]  # held[2]'s stream failed: freed
            assert sorted(u["quota_refused_total"] for u in by_owner.values()) == [0, 2]
            assert all(len(tag) == 12 and TOKENS[0] not in tag for tag in by_owner)
            text = prometheus_text(srv.service.stats())
            assert all(f'sllm_cloud_owner_quota_refused_total{{owner="{tag}"}}' in text
                       and f'sllm_cloud_owner_guess_seconds_total{{owner="{tag}"}} 0' in text for tag in by_owner)
            for conv in held + others:
                try:
                    conv.close()
                except (CloudError, RuntimeError):  # held[2]: its stream ended with the quota's status
                    pass


def test_one_tokens_silent_streams_stay_within_its_pending_quota(cloud_bundle):
    from sllm.cloud.service import PendingStreams

    class FakeStream:
        def __init__(self, owner):
            self.owner, self.ended = owner, None

        def end(self, error):
            self.ended = error.code

    pending = PendingStreams(limit=8, owner_limit=2)
    flood = [FakeStream("A") for _ in range(5)]
    for s in flood:
        pending.enter(s)
    assert [s.ended for s in flood] == [C.RESOURCE_EXHAUSTED] * 3 + [None] * 2
    b = FakeStream("B")
    pending.enter(b)
    assert b.ended is None and len(pending.streams) == 3


# -- 2b. idle and preface-only connections ----------------------------------------------------------
def test_1100_idle_connections_do_not_stop_health_or_open(cloud_bundle):
    with running_server(cloud_bundle, connection_idle_s=1.0, handshake_timeout_s=1.0) as srv, \
            RawConnections() as rc:
        for i in range(1100):
            conn = rc.add(RawConnection(srv.port))
            if i % 2:  # the HTTP/2 preface and nothing more
                conn.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        took = _still_answering(srv.port, None)
        print(f"1100 idle connections: answered in {took:.3f} s")

        def closed(conn):  # the server hung up: EOF (after its SETTINGS / GOAWAY frames, if any)
            conn.sock.settimeout(0.01)
            try:
                while True:
                    if not conn.sock.recv(65536):
                        return True
            except (socket.timeout, BlockingIOError):
                return False
            except OSError:
                return True

        assert _until(lambda: all(closed(c) for c in rc.conns[::50]), 15)


def test_the_descriptor_limit_is_raised_and_leaves_a_reserve():
    """A soft limit of 1,024 (the usual default) is raised to the hard limit before grpc takes connections."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard descriptor limit is {hard}: nothing to raise")
    code = ("import resource; from sllm.cloud.limits import connection_limit; "
            "print(connection_limit(0), *resource.getrlimit(resource.RLIMIT_NOFILE))")
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (util-linux) is not installed")
    out = subprocess.run([prlimit, f"--nofile=1024:{hard}", sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    room, soft_now, hard_now = map(int, out)
    assert soft_now == hard_now == hard and room == hard - FD_RESERVE
    assert connection_limit(100) == 100 and connection_limit(10 ** 9) <= connection_limit(0)


# -- 4. memory follows the accounting ---------------------------------------------------------------
def test_200_rollback_cycles_keep_memory_within_the_budget(tmp_path):
    d, layers, n = 256, 2, 256  # 4 KiB a sentence: a full session is 1 MiB
    write_random_cloud_bundle(tmp_path / "b", model_id=MODEL_ID, d=d, layers=layers, heads=4, max_sentences=n)
    budget = 4 * MIB
    with running_server(tmp_path / "b", kv_budget_bytes=budget, max_sessions=64) as srv, \
            CloudClient(f"127.0.0.1:{srv.port}") as c:
        per_sentence = srv.engine.kv_bytes_per_sentence
        full = _vec(n - 1, d=d)
        convs = [c.conversation(MODEL_ID, d) for _ in range(40)]
        for conv in convs:
            conv.append(_vec(1, d=d))
        rss0 = _rss()
        for cycle in range(200):  # fill a session, roll it back to its first sentence, on to the next
            conv = convs[cycle % len(convs)]
            conv.append(full, position=1)
            conv.append(_vec(1, d=d), position=1)
        held = sum(s.kv.nbytes for s in srv.store.sessions.values() if s.kv is not None)
        grown = _rss() - rss0
        print(f"200 rollback cycles: slots hold {held / MIB:.1f} MiB, RSS +{grown / MIB:.1f} MiB, "
              f"budget {budget / MIB:.0f} MiB, accounted {srv.store.stats()['kv_bytes'] / MIB:.2f} MiB")
        # allocated: what is accounted, each session's last page rounded up (KVSlot.PAGE sentences a page)
        pages = sum(s.kv.pages(s.length) for s in srv.store.sessions.values())
        assert held == pages * per_sentence <= srv.store.stats()["kv_bytes"] + 40 * (KVSlot.PAGE - 1) * per_sentence
        assert grown < budget + 16 * MIB  # was 40 x 1 MiB held after the rollbacks
        for conv in convs:
            conv.close()


# -- 6. the probes speak mutual TLS -----------------------------------------------------------------
def test_health_and_info_commands_speak_mutual_tls(cloud_bundle, tmp_path):
    server_cert, server_key = self_signed_cert(tmp_path)
    ca = make_ca(tmp_path / "ca", "clients-ca")
    probe = issue_cert(tmp_path, ca, "probe")
    with running_server(cloud_bundle, tls_cert=str(server_cert), tls_key=str(server_key),
                        tls_client_ca=str(ca[0])) as srv:
        target = f"127.0.0.1:{srv.port}"
        tls = ["--target", target, "--tls-ca", str(server_cert)]
        r = CliRunner().invoke(app, ["health", *tls])  # no client certificate: no handshake
        assert r.exit_code == 2 and "unreachable" in r.output
        mtls = [*tls, "--tls-cert", str(probe[0]), "--tls-key", str(probe[1])]
        r = CliRunner().invoke(app, ["health", *mtls])
        assert r.exit_code == 0 and "SERVING" in r.output, r.output
        r = CliRunner().invoke(app, ["info", *mtls])
        assert r.exit_code == 0 and MODEL_ID in r.output, r.output
        r = CliRunner().invoke(app, ["health", *tls, "--tls-cert", str(probe[0])])
        assert r.exit_code == 2 and "go together" in r.output

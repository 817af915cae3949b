"""Cloud replicas behind a real nginx on 127.0.0.1 (issue 15), with the edge's real conversation
(edge.connect) and the bundled model's real bundles (models/default), so that greedy text can be
compared: affinity (a reconnect lands on the replica holding the session: no rebuild), failover
when the replica holding a conversation is SIGKILLed in the middle of an answer (the answer goes on,
its text identical to the same conversation on one healthy server), drain by SIGTERM (no error
reaches the user, new conversations go elsewhere, the replica exits 0), all replicas down (one clear
error, exit 2), and `sllm-cloud cluster` itself.

nginx comes from the system (scripts/test.sh installs Debian's package when it is missing and the
tests run as root with apt-get); without it these tests skip, saying so."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from cloud_helpers import MODEL_ID, D
from helpers import ROOT
from typer.testing import CliRunner

from sllm import edge
from sllm.cloud.balancer import NGINX_INSTALL_HINT, SHIPPED_CONFIG, Balancer, find_nginx, loopback_config
from sllm.cloud.cluster import Cluster, ClusterConfig
from sllm.edge.api import EdgeChat
from sllm.edge.chat import ChatSession
from sllm.edge.remote import RemoteStepper
from sllm.edge.cli import app
from sllm.protos.client import SESSION_KEY_HEADER, CloudClient
from sllm.runtime.server_process import serving

if find_nginx() is None:
    pytest.skip(f"nginx is not installed here and could not be installed by scripts/test.sh (it needs root and "
                f"apt-get): {NGINX_INSTALL_HINT}", allow_module_level=True)

MODEL = ROOT / "models" / "default"
EDGE_MANIFEST = json.loads((MODEL / "edge" / "manifest.json").read_text())
TOKEN = "cluster-test-token"
PROMPTS = ("It is a truth universally acknowledged,", "She laughed. Then she was gone.", "Tell me more.")
CAPS = (6, 3, 4)  # sentences per answer


class _Cluster(Cluster):
    """The real cluster, whose routing changes a test can hold back (`routes_open`): a balancer that
    hears of a replica's health late."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.routes_open = threading.Event()
        self.routes_open.set()

    def _health(self, index: int, serving: bool) -> None:
        self.routes_open.wait(30)
        super()._health(index, serving)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    config = ClusterConfig(bundle=MODEL / "cloud", replicas=2, tokens=[TOKEN], grace_s=5, threads=1)
    with _Cluster(config, tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture(scope="module")
def reference(cluster, runtime) -> list[list[str]]:
    """The conversation on one healthy server (replica 0, straight, no balancer): each answer's sentences."""
    with edge.connect(cluster.replicas[0].address, runtime, token=TOKEN) as chat:
        return [[s.text for s in chat.ask(p, max_sentences=n)] for p, n in zip(PROMPTS, CAPS)]


def _stats(cluster) -> list:
    """Each replica's stats, straight from it (None for one not running)."""
    out = []
    for r in cluster.replicas:
        with CloudClient(r.address, TOKEN) as c:
            out.append(c.stats(timeout=5) if r.running() else None)
    return out


def _holder(cluster) -> int:
    """The replica with an attached session (the one conversation open in the test)."""
    held = [i for i, s in enumerate(_stats(cluster)) if s is not None and s.attached_sessions]
    assert len(held) == 1, held
    return held[0]


def _until(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def _replica_of(cluster, key: str) -> int:
    """The replica where nginx sends a conversation of this key (it opens one and looks)."""
    before = [s.sessions_opened_total for s in _stats(cluster)]
    with CloudClient(cluster.address, TOKEN, session_key=key) as c:
        c.conversation(EDGE_MANIFEST["model_id"], EDGE_MANIFEST["d_model"]).close()
    moved = [s.sessions_opened_total - b for s, b in zip(_stats(cluster), before)]
    assert sorted(moved) == [0, 1], moved
    return moved.index(1)


def _key_for(cluster, index: int) -> str:
    """A session key that nginx sends to replica `index`."""
    return next(key for key in (f"probe-{i}" for i in range(64)) if _replica_of(cluster, key) == index)


def _healthy(cluster) -> None:
    """Every replica running (those a test killed or drained started again) and in nginx's config."""
    for i, r in enumerate(cluster.replicas):
        if not r.running():
            r.wait(30)
            cluster.restart_replica(i)
    cluster.wait_routed([True] * len(cluster.replicas))


def test_the_loopback_config_is_the_shipped_one_without_tls(tmp_path):
    """What the cluster runs is cloud/nginx.conf with its replicas, listener and paths: every other
    directive as shipped, TLS left out; nginx accepts it."""
    text = loopback_config(tmp_path, "127.0.0.1:1", [("127.0.0.1:2", True), ("127.0.0.1:3", False)])
    assert "hash $sllm_route consistent" in text and f"$http_{SESSION_KEY_HEADER.replace('-', '_')}" in text
    assert "server 127.0.0.1:3 max_fails=1 fail_timeout=2s down;" in text and "listen 127.0.0.1:1 http2;" in text
    assert "ssl" not in re.sub(r"#.*", "", text) and "grpc_pass grpc://sllm_cloud;" in text
    adapted = ("worker_processes", "pid", "error_log", "access_log", "listen", "grpc_pass", "server ")
    shipped = [ln.split("#")[0].strip() for ln in SHIPPED_CONFIG.read_text().splitlines()]
    kept = [ln for ln in shipped if ln.endswith(";") and not ln.startswith(adapted) and "ssl_" not in ln]
    assert len(kept) > 15 and all(ln in text for ln in kept), [ln for ln in kept if ln not in text]
    (tmp_path / "nginx.conf").write_text(text)
    r = subprocess.run([find_nginx(), "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                        "-e", str(tmp_path / "error.log")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_affinity_a_reconnect_lands_on_the_replica_that_holds_the_session(cluster, runtime, reference):
    """The balancer restarts (every connection through it is cut) between two turns: the next turn
    reconnects to the same replica, which still holds the session: resumed (said once), nothing rebuilt."""
    _healthy(cluster)
    notes = []
    before = _stats(cluster)
    with edge.connect(cluster.address, runtime, token=TOKEN, notify=notes.append) as chat:
        assert [s.text for s in chat.ask(PROMPTS[0], max_sentences=CAPS[0])] == reference[0]
        holder = _holder(cluster)
        cluster.restart_balancer()
        assert [s.text for s in chat.ask(PROMPTS[1], max_sentences=CAPS[1])] == reference[1]
        assert _holder(cluster) == holder
        assert (chat.session.stepper.resumes, chat.session.stepper.rebuilds) == (1, 0), notes
        assert len(notes) == 1 and "resumed it: the server still held it (nothing rebuilt)" in notes[0]
    after = _stats(cluster)
    opened = [a.sessions_opened_total - b.sessions_opened_total for a, b in zip(after, before)]
    steps = [a.steps_total - b.steps_total for a, b in zip(after, before)]
    assert opened[holder] == 1 and sum(opened) == 1  # one session, ever, on one replica
    assert steps[1 - holder] == 0  # the other replica never saw this conversation


def test_conversations_spread_over_replicas_by_key(cluster):
    """Keys spread conversations over the replicas; each key keeps its replica."""
    _healthy(cluster)
    places = {key: _replica_of(cluster, key) for key in (f"key-{i}" for i in range(12))}
    assert set(places.values()) == {0, 1}, places
    assert all(_replica_of(cluster, key) == place for key, place in places.items())


def _vectors(n: int, d: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, d)).astype(np.float32)


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_failover_sigkill_in_the_middle_of_an_answer(cluster, runtime, reference):
    """The replica holding the conversation is SIGKILLed after the first sentence of an answer: the
    edge rebuilds the session on the other replica from its history (said once) and retries the
    step; the answer goes on. Twice, the second time back onto the first replica (restarted in the
    meantime): every answer is identical to the same conversation on one healthy server."""
    _healthy(cluster)
    notes = []
    with edge.connect(cluster.address, runtime, token=TOKEN, notify=notes.append) as chat:
        victims = []
        for turn in range(3):
            answer = chat.ask(PROMPTS[turn], max_sentences=CAPS[turn])
            texts = [next(answer).text]
            if turn != 1:  # turns 0 and 2: kill the replica that holds the conversation, mid-answer
                victims.append(_holder(cluster))
                cluster.signal_replica(victims[-1], signal.SIGKILL)
            texts += [s.text for s in answer]
            assert texts == reference[turn], turn
            assert chat.session.stepper.rebuilds == len(victims) and len(notes) == len(victims), notes
            if turn == 1:
                _healthy(cluster)  # somewhere to go for the second failover
        assert victims[1] == 1 - victims[0] and _holder(cluster) == victims[0]
    assert all(re.match(r"the cloud session was lost \(.*\); rebuilt it from the \d+ history vectors the edge "
                        r"keeps", n) for n in notes), notes


def test_speculation_through_the_balancer_survives_a_failover(cluster, runtime, reference):
    """Sentence-level speculation (what an edge asks of a remote server by default) through nginx: the
    cloud's guesses reach the edge and are accepted; the replica holding the conversation is SIGKILLed
    after the first sentence of the first answer, and the session is rebuilt on the other one (in
    that answer, or at the next turn when the cloud had already guessed the rest of it); every
    answer is the same as without speculation on one healthy server."""
    _healthy(cluster)
    notes = []
    with edge.connect(cluster.address, runtime, token=TOKEN, notify=notes.append, speculate=4) as chat:
        assert chat.session.stepper.conv.speculate == 4
        answer = chat.ask(PROMPTS[0], max_sentences=CAPS[0])
        texts = [next(answer).text]
        cluster.signal_replica(_holder(cluster), signal.SIGKILL)
        answers = [texts + [s.text for s in answer]]
        answers += [[s.text for s in chat.ask(p, max_sentences=n)] for p, n in zip(PROMPTS[1:], CAPS[1:])]
        assert answers == reference
        assert chat.session.stepper.rebuilds == 1 and len(notes) == 1, notes
        assert chat.session.stepper.speculation.stats.accepted > 0


def test_drain_by_sigterm(cluster, runtime, reference):
    """SIGTERM to the replica holding a conversation in the middle of an answer: the answer finishes
    there; the replica goes NOT_SERVING and nginx stops sending to it, so new conversations go to
    the other one, even one that arrives before nginx has heard (it is refused, retried, and lands
    elsewhere); the conversation, handed back between turns, moves on its next turn (rebuilt, said
    once, no error); the replica exits 0."""
    _healthy(cluster)
    notes = []
    with edge.connect(cluster.address, runtime, token=TOKEN, notify=notes.append) as chat:
        answer = chat.ask(PROMPTS[0], max_sentences=CAPS[0])
        texts = [next(answer).text]
        drained = _holder(cluster)
        late = ChatSession(runtime, RemoteStepper(runtime.bundle, lambda: CloudClient(cluster.address, TOKEN),
                                                  cluster.address))
        late.stepper.session_key = _key_for(cluster, drained)  # a new conversation that nginx sends to `drained`
        cluster.routes_open.clear()  # nginx hears of the drain only 0.3 s after it has begun
        try:
            cluster.signal_replica(drained, signal.SIGTERM)
            texts += [s.text for s in answer]
            assert texts == reference[0] and chat.session.stepper.rebuilds == 0  # finished on the draining replica
            assert _until(lambda: not serving(cluster.replicas[drained].address, timeout=2))
            threading.Timer(0.3, cluster.routes_open.set).start()
            late.connect()  # refused by the draining replica (UNAVAILABLE), tried again until nginx routes elsewhere
        finally:
            cluster.routes_open.set()
        with EdgeChat(late) as late_chat:
            assert late_chat.ask(PROMPTS[2], max_sentences=1).text()
            assert [s.attached_sessions if s else 0 for s in _stats(cluster)][1 - drained] == 1
        cluster.wait_routed([i != drained for i in range(2)])
        before = _stats(cluster)[1 - drained].sessions_opened_total
        for _ in range(3):  # new conversations: all on the other replica, none refused
            with edge.connect(cluster.address, runtime, token=TOKEN) as other:
                assert other.ask(PROMPTS[2], max_sentences=1).text()
        assert _stats(cluster)[1 - drained].sessions_opened_total - before == 3
        assert cluster.replicas[drained].wait(15) == 0  # drained: the idle conversation was handed back
        assert [s.text for s in chat.ask(PROMPTS[1], max_sentences=CAPS[1])] == reference[1]
        assert len(notes) == 1 and "shutting down" in notes[0] and "rebuilt it from the" in notes[0], notes


def test_all_replicas_down_is_one_clear_error(tmp_path):
    """nginx with no replica alive behind it: edge-chat says so in one line and exits 2."""
    closed, listen = [_free_address(), _free_address()], _free_address()  # nobody listens on `closed`
    balancer = Balancer(find_nginx(), tmp_path, listen)
    balancer.start([(a, True) for a in closed])
    try:
        t0 = time.monotonic()
        r = CliRunner().invoke(app, ["--server", listen, "--bundle", str(MODEL / "edge"), "--threads", "1",
                                     "--prompt", PROMPTS[0]])
        took = time.monotonic() - t0
    finally:
        balancer.stop(5)
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"the load balancer at {listen} has no cloud replica to send to" in errors[0], errors
    assert "Traceback" not in r.output and took < 20, took


def test_cluster_command_starts_and_stops_everything(cloud_bundle, tmp_path):
    """`sllm-cloud cluster`: prints the address, answers through nginx, and on Ctrl-C (SIGINT) stops
    the replicas and nginx and exits 0 (the tiny random model: what is served does not matter)."""
    proc = subprocess.Popen([sys.executable, "-m", "sllm.cloud.cli", "cluster", "--bundle", str(cloud_bundle),
                             "--replicas", "2", "--port", "0", "--threads", "1", "--grace", "1",
                             "--dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        address = line.split()[-1]
        with CloudClient(address, session_key="k") as c:
            assert c.model_info(timeout=10).model_id == MODEL_ID
            with c.conversation(MODEL_ID, D) as conv:
                assert conv.append(_vectors(1, D)).past_length == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", err)] + [int(p) for p in re.findall(r": pid (\d+),", err)]
    assert len(set(pids)) == 3, err  # nginx and two replicas
    for pid in set(pids):
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower(), pid

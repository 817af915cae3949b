"""What a replica does for the balancer in front of it (issue 15), against a real server on 127.0.0.1
(tiny random model, no nginx needed): a conversation opened with keep_on_disconnect keeps its session
when its stream is cut, so a reconnect resumes it; a draining server hands back the conversations
between turns at once, lets answers in progress finish, and says NOT_SERVING (`sllm-cloud health`).
tests/test_cloud_cluster.py runs the same through nginx with the edge's real conversation."""
import threading
import time

import grpc
import numpy as np
import pytest
from cloud_helpers import MODEL_ID, D, converse_raw, running_server
from typer.testing import CliRunner

from sllm.cloud.cli import app as cloud_app

from sllm.protos.client import SESSION_KEY_HEADER, CloudClient, CloudError
from sllm.protos.v1 import sllm_pb2 as pb
from sllm.protos.wire import pack


@pytest.fixture(scope="module")
def server(cloud_bundle):
    with running_server(cloud_bundle) as srv:
        yield srv


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def _until(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def _held(server) -> tuple[int, int]:
    st = server.store.stats()
    return st["sessions"], st["attached_sessions"]


def test_a_cut_stream_keeps_its_session_only_when_asked(server):
    """keep_on_disconnect: a cancelled stream (and one that ends without Close) leaves its session
    detached, and Open{session_id, history} of the same length resumes it (nothing recomputed);
    without it the session is freed at once, as before."""
    v = _vectors(5)
    with CloudClient(f"127.0.0.1:{server.port}") as c:
        plain = c.conversation(MODEL_ID, D)
        plain.append(v[:2])
        plain.cancel()
        assert _until(lambda: _held(server) == (0, 0))

        conv = c.conversation(MODEL_ID, D, keep_on_disconnect=True)
        conv.append(v[:2])
        last = conv.append(v[2])
        conv.cancel()
        assert _until(lambda: _held(server) == (1, 0))
        again = c.conversation(MODEL_ID, D, session_id=conv.session_id, history=v[:3], keep_on_disconnect=True)
        assert again.resumed and again.past_length == 3
        np.testing.assert_array_equal(again.last.hidden, last.hidden)
        again.append(v[3])
        # the history of another length (a reply lost on the way): refused, so the client starts afresh
        again.cancel()
        assert _until(lambda: _held(server) == (1, 0))
        with pytest.raises(CloudError) as e:
            c.conversation(MODEL_ID, D, session_id=conv.session_id, history=v[:3])
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "holds 4 sentences" in e.value.details
        c.conversation(MODEL_ID, D, session_id=conv.session_id, history=v[:4]).close(keep=False)
    assert _held(server) == (0, 0)
    # the end of the client's stream without Close: kept too
    opened = pb.ClientMessage(open=pb.Open(model_id=MODEL_ID, dim=D, keep_on_disconnect=True))
    append = pb.ClientMessage(append=pb.Append(vectors=pack(v[:1])))
    replies, code, _ = converse_raw(f"127.0.0.1:{server.port}", [opened, append])
    assert code == grpc.StatusCode.OK and replies[-1].closed.kept
    assert _held(server) == (1, 0)
    sid = replies[0].opened.session_id
    with CloudClient(f"127.0.0.1:{server.port}") as c:
        c.conversation(MODEL_ID, D, session_id=sid, history=v[:1]).close(keep=False)
    assert server.store.stats()["kv_bytes"] == 0 and server.store.sentences_in_use == 0


def test_a_step_cut_in_flight_gives_its_room_back(server):
    """A stream cut while its step is in the model: the session is kept as it was before the step
    (its reserved room released, the step's output dropped), so the KV budget accounting stays exact."""
    engine, forward = server.engine, server.engine.forward
    in_model, release = threading.Event(), threading.Event()

    def held_forward(*args, **kwargs):
        in_model.set()
        release.wait(10)
        return forward(*args, **kwargs)

    failed = []

    def step(conv):
        try:
            conv.append(_vectors(1, 1))
        except CloudError as e:
            failed.append(e.code)

    with CloudClient(f"127.0.0.1:{server.port}") as c:
        conv = c.conversation(MODEL_ID, D, keep_on_disconnect=True)
        conv.append(_vectors(2))
        engine.forward = held_forward
        try:
            t = threading.Thread(target=step, args=(conv,))
            t.start()
            assert in_model.wait(10)
            conv.cancel()
            t.join(timeout=10)
            assert _until(lambda: _held(server) == (1, 0))
        finally:
            engine.forward = forward
            release.set()
        assert failed == [grpc.StatusCode.CANCELLED]
        s = next(iter(server.store.sessions.values()))
        assert _until(lambda: server.batcher.queue_depth() == 0 and not server.batcher.running)
        assert (s.length, s.reserved, server.store.sentences_in_use) == (2, 0, 2)
        server.store.free(s, "test over")


def test_draining_hands_back_conversations_between_turns(cloud_bundle):
    """stop(grace=60): a conversation idle between turns is ended at once (UNAVAILABLE, 'shutting
    down': its client rebuilds elsewhere), one in the middle of an answer keeps getting its steps;
    the drain ends when that one closes, not at the end of the grace."""
    with running_server(cloud_bundle, hand_back_idle_s=0.5) as srv, \
            CloudClient(f"127.0.0.1:{srv.port}", session_key="k1") as c:
        target = f"127.0.0.1:{srv.port}"
        assert _health(target) == (0, f"{target}: SERVING")
        idle = c.conversation(MODEL_ID, D, keep_on_disconnect=True)
        idle.append(_vectors(2))
        busy = c.conversation(MODEL_ID, D, keep_on_disconnect=True)
        busy.append(_vectors(2))
        t0 = time.monotonic()
        stopper = threading.Thread(target=srv.stop, kwargs={"grace": 60.0})
        stopper.start()
        assert _until(lambda: srv.service.draining)
        assert _health(target) == (1, f"{target}: NOT_SERVING")  # what a balancer's probe reads
        steps = 0
        while time.monotonic() - t0 < 1.5:  # an answer: a step every 50 ms
            busy.append(_vectors(1, steps))
            steps += 1
            time.sleep(0.05)
        with pytest.raises(CloudError) as e:
            idle.append(_vectors(1))
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details
        assert e.value.reason == pb.SHUTTING_DOWN  # what clients decide on
        busy.close()
        stopper.join(timeout=30)
        assert not stopper.is_alive() and time.monotonic() - t0 < 10 and steps >= 10
    assert _health(target)[0] == 2  # gone


def _health(target: str) -> tuple[int, str]:
    """`sllm-cloud health`: (exit code, what it printed on stdout)."""
    r = CliRunner().invoke(cloud_app, ["health", "--target", target, "--timeout", "2"])
    return r.exit_code, r.stdout.strip()


def test_the_session_key_is_metadata_of_every_call():
    """CloudClient sends the conversation's key (for a balancer to hash on) with its token."""
    c = CloudClient("127.0.0.1:1", token="t", session_key="abc")
    assert c.metadata == (("authorization", "Bearer t"), (SESSION_KEY_HEADER, "abc"))
    c.session_key = None
    assert c.metadata == (("authorization", "Bearer t"),)
    c.close()

"""Sessions belong to the token that opened them (issue 14, point 3), on a real server on 127.0.0.1.

A hypothesis state machine drives random interleavings of open / append / close{keep} / close /
cancel / resume / rebuild by three clients (two share token A, one has token B) over server-picked
ids and ids several clients choose alike (squatting), and checks every answer against a model of
the rules: a session is filed under (owner, id); only its owner resumes it; a rebuild under an id
lands on the caller's own session or makes a new one from the history it sent; nothing tells one
owner about another owner's ids, held or expired; no error message carries a session id.
"""
import time
import uuid
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from cloud_helpers import MODEL_ID, D, captured_logs, reference_outputs, running_server
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from sllm.protos.client import CloudClient, CloudError

C = grpc.StatusCode
TOKENS = {"A": "owner-a-token", "B": "owner-b-token"}
CLIENTS = {"a1": "A", "a2": "A", "b1": "B"}  # client -> the token it holds (its owner)
MAX_STREAMS = 6


@pytest.fixture(scope="module")
def server(cloud_bundle):
    with running_server(cloud_bundle, tokens=list(TOKENS.values())) as srv:
        yield srv


@dataclass
class Held:
    """The model of one session the server holds."""
    length: int
    attached: bool
    last: np.ndarray | None  # the hidden state of its last step, as its owner got it


@dataclass
class Stream:
    client: str
    owner: str
    sid: str
    conv: object


class OwnershipMachine(RuleBasedStateMachine):
    srv = None  # set by the test
    model = None  # the torch model, for rebuilt sessions' first answer
    clients: dict = {}

    def __init__(self):
        super().__init__()
        nonce = uuid.uuid4().hex[:6]  # examples do not see each other's chosen ids
        self.chosen = [f"shared-{nonce}-{k}" for k in range(3)]
        self.ids = list(self.chosen)  # every id anyone chose or was given, in order of appearance
        self.held: dict[tuple[str, str], Held] = {}
        self.gone: dict[tuple[str, str], None] = {}  # freed (owner, id), in order
        self.streams: list[Stream] = []
        self.rng = np.random.default_rng(0)

    # -- helpers ---------------------------------------------------------------------------------
    def _vectors(self, n):
        return self.rng.standard_normal((n, D)).astype(np.float32)

    def _open(self, client, **kw):
        return self.clients[client].conversation(MODEL_ID, D, **kw)

    def _refused(self, e: CloudError, sid: str, code, words: str) -> None:
        assert (e.code, words in e.details) == (code, True), (e.code, e.details)
        assert sid not in e.details, e.details  # ids never appear in error messages

    def _draw_id(self, data) -> str:
        """Any id seen so far, most often one a detached session is held under (by whichever owner),
        or one that some owner's session had.
        Lists in order of appearance, never sorted: the server's ids are random, the draws must not be."""
        held = list(dict.fromkeys(sid for _, sid in self.held))
        detached = list(dict.fromkeys(sid for (_, sid), h in self.held.items() if not h.attached))
        gone = list(dict.fromkeys(sid for _, sid in self.gone))
        pools = [st.sampled_from(ids) for ids in (detached, held, gone) if ids]
        return data.draw(st.one_of(*pools, st.sampled_from(self.ids)))

    def _attach(self, client, owner, sid, conv) -> None:
        self.streams.append(Stream(client, owner, sid, conv))
        if sid not in self.ids:
            self.ids.append(sid)

    def _wait_freed(self) -> None:
        want = sum(h.attached for h in self.held.values())
        end = time.monotonic() + 5
        while self.srv.store.stats()["attached_sessions"] != want and time.monotonic() < end:
            time.sleep(0.005)

    # -- rules -----------------------------------------------------------------------------------
    @precondition(lambda self: len(self.streams) < MAX_STREAMS)
    @rule(client=st.sampled_from(sorted(CLIENTS)), n=st.integers(0, 2))
    def open_new(self, client, n):
        history = self._vectors(n) if n else None
        conv = self._open(client, history=history)
        owner = CLIENTS[client]
        assert not conv.resumed and conv.past_length == n
        assert all(sid != conv.session_id for _, sid in self.held)  # a fresh server-picked id
        self.held[(owner, conv.session_id)] = Held(n, True, conv.last.hidden if n else None)
        self._attach(client, owner, conv.session_id, conv)

    @precondition(lambda self: self.streams)
    @rule(data=st.data())
    def append(self, data):
        s = data.draw(st.sampled_from(self.streams))
        h = self.held[(s.owner, s.sid)]
        step = s.conv.append(self._vectors(1))
        h.length += 1
        assert step.past_length == h.length
        h.last = step.hidden

    @precondition(lambda self: self.streams)
    @rule(data=st.data(), how=st.sampled_from(["keep", "keep", "free", "cancel"]))
    def end_stream(self, data, how):
        s = data.draw(st.sampled_from(self.streams))
        self.streams.remove(s)
        key = (s.owner, s.sid)
        if how == "keep":
            assert s.conv.close(keep=True) is True
            self.held[key].attached = False
            return
        if how == "free":
            assert s.conv.close(keep=False) is False
        else:
            s.conv.cancel()
        del self.held[key]
        self.gone[key] = None
        self._wait_freed()  # a cancel is noticed by the server a moment later

    @precondition(lambda self: len(self.streams) < MAX_STREAMS)
    @rule(client=st.sampled_from(sorted(CLIENTS)), data=st.data())
    def resume(self, client, data):
        self._resume(client, self._draw_id(data))

    @precondition(lambda self: self.streams)
    @rule(data=st.data(), client=st.sampled_from(sorted(CLIENTS)), keep=st.booleans())
    def hand_over(self, data, client, keep):
        """Close a stream (keeping its session or not), then `client`, maybe of another token, asks for
        the session at once."""
        s = data.draw(st.sampled_from(self.streams))
        assert s.conv.close(keep=keep) is keep
        self.streams.remove(s)
        if keep:
            self.held[(s.owner, s.sid)].attached = False
        else:
            del self.held[(s.owner, s.sid)]
            self.gone[(s.owner, s.sid)] = None
        self._resume(client, s.sid)

    def _resume(self, client, sid):
        owner = CLIENTS[client]
        h = self.held.get((owner, sid))
        try:
            conv = self._open(client, session_id=sid)
        except CloudError as e:
            if h is not None and h.attached:
                self._refused(e, sid, C.FAILED_PRECONDITION, "attached to another open stream")
            elif h is None and (owner, sid) in self.gone:
                self._refused(e, sid, C.NOT_FOUND, "no longer held")
            else:  # never this owner's: whether another owner has (or had) it is not told
                assert h is None, (e.code, e.details)
                self._refused(e, sid, C.NOT_FOUND, "unknown session;")
            return
        assert h is not None and not h.attached, "resumed a session that is not the caller's to resume"
        assert conv.resumed and conv.session_id == sid and conv.past_length == h.length
        if h.last is None:
            assert conv.last is None
        else:  # its owner's own last answer, bit for bit
            np.testing.assert_array_equal(conv.last.hidden, h.last)
        h.attached = True
        self._attach(client, owner, sid, conv)

    @precondition(lambda self: len(self.streams) < MAX_STREAMS)
    @rule(client=st.sampled_from(sorted(CLIENTS)), data=st.data())
    def rebuild(self, client, data):
        sid = self._draw_id(data)
        owner = CLIENTS[client]
        h = self.held.get((owner, sid))
        n = data.draw(st.integers(1, 3) | st.just(max(1, h.length if h else 1)))
        history = self._vectors(n)
        try:
            conv = self._open(client, session_id=sid, history=history)
        except CloudError as e:
            assert h is not None, (e.code, e.details)
            if h.attached:
                self._refused(e, sid, C.FAILED_PRECONDITION, "attached to another open stream")
            else:
                assert h.length != n
                self._refused(e, sid, C.FAILED_PRECONDITION, f"holds {h.length} sentences")
            return
        assert conv.session_id == sid and conv.past_length == n
        if h is not None:  # its own detached session, same length: resumed, nothing recomputed
            assert not h.attached and h.length == n and conv.resumed
            if h.last is not None:
                np.testing.assert_array_equal(conv.last.hidden, h.last)
            h.attached = True
        else:  # a new session of this owner, computed from the history it sent and nothing else
            assert not conv.resumed
            np.testing.assert_allclose(conv.last.hidden, reference_outputs(self.model, history)[0][-1],
                                       atol=1e-5, rtol=0)
            self.held[(owner, sid)] = Held(n, True, conv.last.hidden)
            self.gone.pop((owner, sid), None)
        self._attach(client, owner, sid, conv)

    # -- invariants and cleanup ------------------------------------------------------------------
    @invariant()
    def server_holds_what_the_model_holds(self):
        st_ = self.srv.store.stats()
        assert st_["sessions"] == len(self.held)
        assert st_["attached_sessions"] == sum(h.attached for h in self.held.values())
        with self.srv.store.lock:
            lengths = {key: s.length for key, s in self.srv.store.sessions.items()}
        assert sorted(lengths.values()) == sorted(h.length for h in self.held.values())

    def teardown(self):
        for s in self.streams:
            s.conv.cancel()
        end = time.monotonic() + 5
        while self.srv.store.stats()["attached_sessions"] and time.monotonic() < end:
            time.sleep(0.005)
        self.srv.store.free_all("end of the example")


def test_sessions_belong_to_the_token_that_opened_them(server, cloud_model):
    target = f"127.0.0.1:{server.port}"
    clients = {name: CloudClient(target, token=TOKENS[owner]) for name, owner in CLIENTS.items()}
    OwnershipMachine.srv, OwnershipMachine.model, OwnershipMachine.clients = server, cloud_model, clients
    try:
        run_state_machine_as_test(OwnershipMachine, settings=settings(
            max_examples=30, stateful_step_count=25, deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]))
    finally:
        for c in clients.values():
            c.close()


def test_session_ids_stay_out_of_logs_and_messages(cloud_bundle):
    sid = f"private-{uuid.uuid4().hex}"
    with running_server(cloud_bundle, tokens=list(TOKENS.values())) as srv, captured_logs() as logs, \
            CloudClient(f"127.0.0.1:{srv.port}", token=TOKENS["A"]) as a, \
            CloudClient(f"127.0.0.1:{srv.port}", token=TOKENS["B"]) as b:
        conv = a.conversation(MODEL_ID, D, session_id=sid, history=np.ones((2, D), np.float32))
        with pytest.raises(CloudError) as e:  # attached: refused, without echoing the id
            a.conversation(MODEL_ID, D, session_id=sid)
        assert e.value.code == C.FAILED_PRECONDITION and sid not in e.value.details
        conv.append(np.ones((1, D), np.float32))
        conv.close(keep=True)
        with pytest.raises(CloudError) as e:  # another token: as if it never existed
            b.conversation(MODEL_ID, D, session_id=sid)
        assert e.value.code == C.NOT_FOUND and e.value.details.startswith("unknown session;")
        with a.conversation(MODEL_ID, D, session_id=sid) as again:
            assert again.resumed
    events = {entry["event"] for entry in logs}
    assert {"session_open", "session_detach", "session_resume", "session_free", "stream_error"} <= events
    assert not any(sid in str(entry) for entry in logs)
    tags = {entry["session"] for entry in logs if entry.get("session")}
    assert len(tags) == 1 and all(len(t) == 12 and int(t, 16) >= 0 for t in tags)  # one session, one tag

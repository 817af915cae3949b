"""Typed errors: every status the service sends carries an ErrorReason (trailing metadata
`sllm-error-reason`), and the edge decides on status codes and reasons only. Shown on a real server
(models/default) whose every error message is reworded: the edge retries, resumes, rebuilds, picks a
new routing key and explains failures exactly as with the real wording. And read from the source: no
edge module matches message text, and no server status leaves but through cloud.errors.abort."""
import ast
import codecs
import re
import time

import grpc
import numpy as np
import pytest
from cloud_helpers import running_server
from helpers import ROOT

from sllm import edge
from sllm.cloud.batcher import shutting_down
from sllm.cloud.errors import CODES, ServiceError
from sllm.edge.failures import EdgeError, explain, rebuildable, retryable
from sllm.edge.remote import RemoteStepper
from sllm.protos.client import CloudClient, CloudError
from sllm.protos.errors import REASON_KEY, UNSPECIFIED, reason_metadata, reason_of
from sllm.protos.v1 import sllm_pb2 as pb

MODEL = ROOT / "models" / "default"
TOKEN = "reasons-token"
REWORDED = "[reworded] "
PROMPT = "It is a truth universally acknowledged, that a single man must be in want of a wife."


@pytest.fixture(scope="module")
def server():
    with running_server(MODEL / "cloud", threads=1, tokens=[TOKEN]) as srv:
        yield srv


@pytest.fixture(scope="module")
def idle_server():
    with running_server(MODEL / "cloud", threads=1, tokens=[TOKEN], idle_timeout_s=0.5) as srv:
        yield srv


def reword_every_message(monkeypatch) -> None:
    """Every ServiceError made from now on (in this process: the in-process servers) says its message in
    other words: rot13, so no phrase of the original survives."""
    original = ServiceError.__init__

    def reworded(self, reason, message, code=None):
        original(self, reason, REWORDED + codecs.encode(message, "rot13"), code)

    monkeypatch.setattr(ServiceError, "__init__", reworded)
    assert ServiceError(pb.SHUTTING_DOWN, "the server is shutting down").message == \
        REWORDED + "gur freire vf fuhggvat qbja"


class Scenario:
    """One edge behaviour against a server: `run()` returns what the edge did, in words the edge chose
    (server messages left out) and `shown`, the texts it showed (where the server's message appears)."""

    def __init__(self, runtime, server, token: str = TOKEN):
        self.runtime, self.server, self.token = runtime, server, token
        self.target = f"127.0.0.1:{server.port}"
        self.notes: list[str] = []
        self.keys: list[str] = []  # the routing key of every connection made
        self.steppers: list[RemoteStepper] = []

    def stepper(self, model=None) -> RemoteStepper:
        stepper = None

        def factory() -> CloudClient:
            self.keys.append(stepper.session_key)
            return CloudClient(self.target, self.token)

        stepper = RemoteStepper(model or self.runtime.bundle, factory, self.target, notify=self.notes.append,
                                attempts=3, backoff_s=0.01)
        self.steppers.append(stepper)
        return stepper

    def vectors(self, text: str = PROMPT) -> np.ndarray:
        return self.runtime.encode(self.runtime.prompt_sentences(text))

    def held(self, session_id: str):
        return next(s for s in self.server.store.sessions.values() if s.id == session_id)

    def close(self) -> None:
        for s in self.steppers:
            s.close()

    def failure(self, action) -> dict:
        """An action that must fail: the EdgeError's class, code, reason and the edge's words before the
        server's message."""
        with pytest.raises(EdgeError) as e:
            action()
        words = re.split(r" \(|: ", str(e.value).replace(self.target, "TARGET"), maxsplit=1)[0]
        return {"error": type(e.value).__name__, "code": e.value.code, "reason": e.value.reason, "words": words,
                "shown": [str(e.value)]}

    def recovery(self, stepper: RemoteStepper, vectors: np.ndarray) -> dict:
        """An append that must succeed after the session was lost: how it came back."""
        n = len(stepper.history)
        step = stepper.append(vectors)
        assert step.past_length == n + len(vectors) and len(stepper.history) == step.past_length
        notes = [(note.split(":", 1)[0], note.rsplit("); ", 1)[-1]) for note in self.notes]
        return {"rebuilds": stepper.rebuilds, "resumes": stepper.resumes, "notes": notes, "shown": self.notes}


def _wait(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def bad_token(sc: Scenario) -> dict:
    sc.token = "not-the-token"
    return sc.failure(sc.stepper().connect)


def model_mismatch(sc: Scenario) -> dict:
    """A model the edge's own check lets through (a stand-in for the bundle's identity) but the server's
    Open refuses: the explanation follows the reason."""

    class Other:
        model_id, d_model = "sllm-another-model", sc.runtime.d_model

        @staticmethod
        def cloud_mismatch(*args):
            return None

    return sc.failure(sc.stepper(Other()).connect)


def draining_at_open(sc: Scenario) -> dict:
    """Open refused as SHUTTING_DOWN: tried again under a new routing key each time (a balancer would
    send it elsewhere), then explained."""
    sc.server.service.draining = True
    try:
        out = sc.failure(sc.stepper().connect)
    finally:
        sc.server.service.draining = False
    return {**out, "keys": len(sc.keys), "distinct_keys": len(set(sc.keys))}


def handed_back(sc: Scenario) -> dict:
    """A draining server ends a stream between turns (SHUTTING_DOWN): the next append rebuilds."""
    stepper = sc.stepper()
    stepper.connect()
    stepper.append(sc.vectors())
    assert sc.server.store.hand_back(0.0, shutting_down("this replica is shutting down; rebuild elsewhere")) >= 1
    # hand_back only asks the stream to end: wait until it has (the session detached), or the next
    # Append can still be stepped on the old stream before the end reaches it
    _wait(lambda: sc.server.store.stats()["attached_sessions"] == 0)
    return {**sc.recovery(stepper, sc.vectors("Go on.")), "same_key": len(set(sc.keys)) == 1}


def session_freed(sc: Scenario) -> dict:
    """The server no longer holds the session (evicted): the append's NOT_FOUND rebuilds it."""
    stepper = sc.stepper()
    stepper.connect()
    stepper.append(sc.vectors())
    sc.server.store.free(sc.held(stepper.session_id), "evicted by the test")
    return sc.recovery(stepper, sc.vectors("Go on."))


def session_idle(sc: Scenario) -> dict:
    """The idle timeout frees the session and ends its stream (SESSION_IDLE): rebuilt."""
    stepper = sc.stepper()
    stepper.connect()
    stepper.append(sc.vectors())
    _wait(lambda: sc.server.store.stats()["sessions"] == 0)
    return sc.recovery(stepper, sc.vectors("Go on."))


def history_mismatch(sc: Scenario) -> dict:
    """Reconnecting to a held session whose length is not the edge's history (a reply lost on the way):
    HISTORY_MISMATCH, so a new session from the history at once."""
    stepper = sc.stepper()
    stepper.connect()
    stepper.append(sc.vectors())
    stepper.history.append(stepper.history[-1])  # the edge believes in one sentence more than the server holds
    session = sc.held(stepper.session_id)
    stepper.drop("cut by the test", resumable=True)
    _wait(lambda: not session.attached)  # kept, detached (keep_on_disconnect)
    return sc.recovery(stepper, sc.vectors("Go on."))


def session_attached(sc: Scenario) -> dict:
    """Reconnecting to a session still attached to another stream: SESSION_ATTACHED, waited for once,
    then a new session from the history."""
    first, second = sc.stepper(), sc.stepper()
    first.connect()
    first.append(sc.vectors())
    second.connect()
    second.session_id, second.history = first.session_id, list(first.history)  # as if it were the same edge
    second.drop("cut by the test", resumable=True)
    out = sc.recovery(second, sc.vectors("Go on."))
    return {**out, "own_session": second.session_id != first.session_id}


def history_kept(sc: Scenario) -> dict:
    """The control: a cut stream whose session the server still holds is resumed, nothing rebuilt."""
    stepper = sc.stepper()
    stepper.connect()
    stepper.append(sc.vectors())
    session = sc.held(stepper.session_id)
    stepper.drop("cut by the test", resumable=True)
    _wait(lambda: not session.attached)
    return sc.recovery(stepper, sc.vectors("Go on."))


SCENARIOS = {f.__name__: f for f in (bad_token, model_mismatch, draining_at_open, handed_back, session_freed,
                                     session_idle, history_mismatch, session_attached, history_kept)}
SERVER_TEXT_SHOWN = {"bad_token", "model_mismatch", "draining_at_open", "handed_back", "session_freed",
                     "session_idle"}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_the_edge_behaves_the_same_when_every_server_message_is_reworded(runtime, server, idle_server, name,
                                                                         monkeypatch):
    def run() -> tuple[dict, list[str]]:
        sc = Scenario(runtime, idle_server if name == "session_idle" else server)
        try:
            out = SCENARIOS[name](sc)
        finally:
            sc.close()
        return out, out.pop("shown")

    plain, plain_shown = run()
    reword_every_message(monkeypatch)
    reworded, reworded_shown = run()
    assert reworded == plain
    if name in SERVER_TEXT_SHOWN:  # the edge did see the reworded text, and showed it as the server's words
        assert not any(REWORDED in s for s in plain_shown) and any(REWORDED in s for s in reworded_shown)


def test_what_each_scenario_shows(runtime, server, idle_server):
    """The behaviours compared above are the intended ones (not merely equal)."""
    def run(name):
        sc = Scenario(runtime, idle_server if name == "session_idle" else server)
        try:
            return SCENARIOS[name](sc)
        finally:
            sc.close()

    bad = run("bad_token")
    assert (bad["code"], bad["reason"], bad["words"]) == (grpc.StatusCode.UNAUTHENTICATED, pb.BAD_TOKEN,
                                                         "the cloud server at TARGET refused the bearer token")
    mismatch = run("model_mismatch")
    assert mismatch["reason"] == pb.MODEL_MISMATCH
    assert mismatch["words"] == "the edge bundle and the cloud model are not halves of the same model"
    draining = run("draining_at_open")
    assert draining["words"] == "the cloud server at TARGET is shutting down" and draining["reason"] == pb.SHUTTING_DOWN
    assert draining["keys"] == draining["distinct_keys"] == 3  # a new key for every try
    back = run("handed_back")
    assert (back["rebuilds"], back["resumes"], back["same_key"]) == (1, 0, True)
    assert back["notes"] == [("the cloud session was lost (UNAVAILABLE", back["notes"][0][1])]
    assert back["notes"][0][1].startswith("rebuilt it from the")
    for name, code in (("session_freed", "NOT_FOUND"), ("session_idle", "RESOURCE_EXHAUSTED")):
        out = run(name)
        assert (out["rebuilds"], out["resumes"]) == (1, 0), name
        assert out["notes"][0][0] == f"the cloud session was lost ({code}", out
    for name in ("history_mismatch", "session_attached"):
        out = run(name)
        assert (out["rebuilds"], out["resumes"]) == (1, 0), (name, out)
    assert run("session_attached")["own_session"]
    kept = run("history_kept")
    assert (kept["rebuilds"], kept["resumes"]) == (0, 1)


# ---------------------------------------------------------------- the decisions, case by case

C = grpc.StatusCode


@pytest.mark.parametrize("code, reason, retry, rebuild", [
    (C.UNAVAILABLE, UNSPECIFIED, True, True),  # a connection refused or dropped (gRPC, the network)
    (C.INTERNAL, UNSPECIFIED, True, True),  # a stream a proxy reset (RST_STREAM)
    (C.UNKNOWN, UNSPECIFIED, True, True),  # a stream that ended without an answer
    (C.CANCELLED, UNSPECIFIED, True, True),
    (C.DEADLINE_EXCEEDED, UNSPECIFIED, False, False),  # waiting as long again would not help
    (C.RESOURCE_EXHAUSTED, UNSPECIFIED, False, False),  # gRPC's own message-size limit
    (C.UNAVAILABLE, pb.SHUTTING_DOWN, True, True),
    (C.UNAVAILABLE, pb.MODEL_STOPPED, True, True),
    (C.UNAVAILABLE, pb.NO_REPLICA, True, True),
    (C.NOT_FOUND, pb.SESSION_NOT_FOUND, False, True),
    (C.RESOURCE_EXHAUSTED, pb.SESSION_IDLE, False, True),
    (C.CANCELLED, pb.STREAM_ENDED, False, True),
    (C.INTERNAL, pb.SERVER_BUG, False, False),  # a bug on the server: the same step would fail again
    (C.INTERNAL, pb.MODEL_FAILED, False, False),
    (C.RESOURCE_EXHAUSTED, pb.SESSION_FULL, False, False),
    (C.RESOURCE_EXHAUSTED, pb.SERVER_FULL, False, False),
    (C.FAILED_PRECONDITION, pb.MODEL_MISMATCH, False, False),
    (C.INVALID_ARGUMENT, pb.BAD_REQUEST, False, False),
    (C.UNAUTHENTICATED, pb.BAD_TOKEN, False, False),
])
def test_decisions_follow_code_and_reason_whatever_the_words(code, reason, retry, rebuild):
    for words in ("", "the server is shutting down", "RST_STREAM", "idle", "attached", "mismatch", "xyzzy"):
        e = CloudError(code, words, reason)
        assert (retryable(e), rebuildable(e)) == (retry, rebuild), (code, reason, words)
    # the explanation's own words (before the server's) depend on code and reason only
    first = explain(CloudError(code, "one wording", reason), "h:1").split(" (")[0].split(": ")[0]
    second = explain(CloudError(code, "another wording", reason), "h:1").split(" (")[0].split(": ")[0]
    assert first == second


def test_the_reason_travels_in_trailing_metadata():
    assert reason_metadata(pb.SESSION_IDLE) == ((REASON_KEY, "SESSION_IDLE"),)
    assert reason_of(reason_metadata(pb.SESSION_IDLE)) == pb.SESSION_IDLE
    assert reason_of([("other", "x")]) == reason_of(None) == UNSPECIFIED
    assert reason_of([(REASON_KEY, "A_REASON_FROM_A_NEWER_SERVER")]) == UNSPECIFIED  # unknown: as if none


def test_every_reason_has_its_status_code():
    sent_by_the_service = set(pb.ErrorReason.values()) - {UNSPECIFIED, pb.NO_REPLICA}  # NO_REPLICA: the balancer's
    assert set(CODES) == sent_by_the_service


def test_the_balancer_sends_its_reason():
    conf = (ROOT / "cloud" / "nginx.conf").read_text()
    assert re.search(rf"add_header {REASON_KEY} NO_REPLICA always;", conf)


# ---------------------------------------------------------------- read from the source

_TEXT_METHODS = {"startswith", "endswith", "find", "rfind", "index", "count", "lower", "upper", "casefold", "split",
                 "partition", "search", "match", "fullmatch", "findall"}


def _mentions_message(node: ast.AST) -> bool:
    """Does the expression read a status message (`.details`, `details`, `.message`, str(e))?"""
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and n.attr in ("details", "message"):
            return True
        if isinstance(n, ast.Name) and n.id in ("details", "message"):
            return True
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "str" and n.args:
            return True
    return False


def text_decisions(source: str) -> list[str]:
    """Places where code inspects a message's text: `x in <message>`, `<message> == "..."`, a string
    method or regex on it."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for op, right in zip(node.ops, operands[1:]):
                if isinstance(op, (ast.In, ast.NotIn)) and _mentions_message(right):
                    found.append(ast.unparse(node))
                if isinstance(op, (ast.Eq, ast.NotEq)) and any(_mentions_message(o) for o in operands):
                    found.append(ast.unparse(node))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in _TEXT_METHODS and (_mentions_message(node.func.value)
                                                     or any(_mentions_message(a) for a in node.args)):
                found.append(ast.unparse(node))
    return found


def test_the_detector_finds_message_matching():
    assert text_decisions('if "shutting down" in (e.details or ""): pass')
    assert text_decisions('if e.code == X and "RST_STREAM" in e.details: pass')
    assert text_decisions('x = "too many pings" in details.lower()')
    assert text_decisions('ok = re.search("idle", e.details)')
    assert text_decisions('ok = str(e).startswith("mismatch")')
    assert not text_decisions('if e.reason == pb.SESSION_IDLE and e.code in CODES: pass')


def test_no_edge_decision_reads_a_message():
    """The edge's retry, rebuild and explanation logic (and the client under it) never looks at words."""
    files = sorted((ROOT / "edge").glob("*.py")) + [ROOT / "protos" / "client.py", ROOT / "protos" / "errors.py"]
    found = {str(f.relative_to(ROOT)): text_decisions(f.read_text()) for f in files}
    assert not {f: hits for f, hits in found.items() if hits}


def test_every_server_status_leaves_through_abort_with_a_reason():
    """context.abort only in cloud.errors.abort (which sends the reason), and every ServiceError names
    its reason: the first argument is a pb.<ErrorReason>."""
    for path in sorted((ROOT / "cloud").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, (ast.Attribute, ast.Name)):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            if name == "abort" and isinstance(node.func, ast.Attribute):
                assert path.name == "errors.py", f"{path.name}: {ast.unparse(node)}"
            if name == "ServiceError":
                first = node.args[0] if node.args else None
                assert (isinstance(first, ast.Attribute) and isinstance(first.value, ast.Name)
                        and first.value.id == "pb" and first.attr in pb.ErrorReason.keys()), \
                    f"{path.name}: {ast.unparse(node)}"

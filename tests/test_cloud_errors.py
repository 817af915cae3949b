"""Bad input never crashes or poisons the server: each gets a precise gRPC status, its ErrorReason
and a clear message, the session is freed, and other clients are unaffected. Limits: sentences
per session, sessions, KV budget, message size, idle timeout, with clean eviction."""
import threading
import time

import grpc
import numpy as np
import pytest
from cloud_helpers import MODEL_ID, D, converse_raw, reference_outputs, running_server
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sllm.protos.client import CloudClient, CloudError
from sllm.protos.v1 import sllm_pb2 as pb
from sllm.protos.wire import pack

C = grpc.StatusCode


@pytest.fixture(scope="module")
def server(cloud_bundle):
    # max_abs above float32's range: only the model's own overflow guard stops huge values
    with running_server(cloud_bundle, max_sentences=8, max_message_bytes=64 * 1024, max_abs=1e39) as srv:
        yield srv


def _target(server):
    return f"127.0.0.1:{server.port}"


def _vec(n=1, seed=0, dim=D):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _open(**kw):
    kw.setdefault("model_id", MODEL_ID)
    kw.setdefault("dim", D)
    return pb.ClientMessage(open=pb.Open(**kw))


def _append(vectors=None, **fields):
    v = pack(_vec()) if vectors is None else vectors
    for k, val in fields.items():
        setattr(v, k, val)
    return pb.ClientMessage(append=pb.Append(vectors=v))


def _nan_vectors():
    x = _vec(2)
    x[1, 3] = np.nan
    return pack(x, check=False)


def _inf16_vectors():
    return pack(np.full((1, D), 1e6), "float16", check=False)


BAD_INPUTS = {
    # name: (messages, code, words in the message)
    "empty stream": ([], C.INVALID_ARGUMENT, "empty stream"),
    "empty message": ([pb.ClientMessage()], C.INVALID_ARGUMENT, "empty ClientMessage"),
    "append before open": ([_append()], C.FAILED_PRECONDITION, "first message of a stream must be Open"),
    "close before open": ([pb.ClientMessage(close=pb.Close())], C.FAILED_PRECONDITION, "must be Open"),
    "second open": ([_open(), _open()], C.FAILED_PRECONDITION, "one Open per stream"),
    "model id mismatch": ([_open(model_id="sllm-other")], C.FAILED_PRECONDITION, "model mismatch"),
    "model id missing": ([_open(model_id="")], C.INVALID_ARGUMENT, "model_id is empty"),
    "open dim mismatch": ([_open(dim=16)], C.FAILED_PRECONDITION, "dimension mismatch"),
    "open dim missing": ([_open(dim=0)], C.INVALID_ARGUMENT, "open.dim is 0"),
    "bad reply dtype": ([_open(reply_dtype=9)], C.INVALID_ARGUMENT, "reply_dtype"),
    "bad session id": ([_open(session_id="../../etc/passwd")], C.INVALID_ARGUMENT, "not a session id"),
    "unknown session": ([_open(session_id="never-opened")], C.NOT_FOUND, "unknown session;"),
    "append without vectors": ([_open(), pb.ClientMessage(append=pb.Append())], C.INVALID_ARGUMENT,
                               "append.vectors is missing"),
    "wrong dim": ([_open(), _append(pack(_vec(dim=16)))], C.INVALID_ARGUMENT, "dim is 16, this model's"),
    "wrong dtype": ([_open(), _append(dtype=pb.DTYPE_UNSPECIFIED)], C.INVALID_ARGUMENT, "dtype"),
    "unknown dtype": ([_open(), _append(dtype=5)], C.INVALID_ARGUMENT, "dtype"),
    "bytes disagree with count": ([_open(), _append(count=3)], C.INVALID_ARGUMENT, "bytes"),
    "zero count": ([_open(), _append(count=0, data=b"")], C.INVALID_ARGUMENT, "count is 0"),
    "NaN": ([_open(), _append(_nan_vectors())], C.INVALID_ARGUMENT, "NaN or Inf (first in vector 1)"),
    "Inf in float16": ([_open(), _append(_inf16_vectors())], C.INVALID_ARGUMENT, "NaN or Inf"),
    "bad history": ([_open(history=pb.Vectors(data=b"\x00" * 8, dtype=pb.DTYPE_FLOAT32, dim=D, count=1))],
                    C.INVALID_ARGUMENT, "open.history.data holds 8 bytes"),
    "history over the sentence limit": ([_open(history=pack(_vec(9)))], C.RESOURCE_EXHAUSTED,
                                        "at most 8"),
    "too many sentences": ([_open(), _append(pack(_vec(6))), _append(pack(_vec(3)))], C.RESOURCE_EXHAUSTED,
                           "limit of 8 per session"),
    # finite, but its first LayerNorm overflows (in torch and in ONNX Runtime, which maps a constant row to zeros)
    "overflow in the model": ([_open(), _append(pack(np.tile(np.float32([3e38, -3e38]), (1, D // 2))))],
                              C.INVALID_ARGUMENT,
                              "not finite"),
    "oversized message": ([_open(), _append(pack(_vec(600)))], C.RESOURCE_EXHAUSTED, "larger than max"),
    "not a ClientMessage": ([b"\xff\xff\xff"], C.INVALID_ARGUMENT, "not a sllm.v1.ClientMessage"),
}
# the ErrorReason each refusal carries (trailing metadata): INVALID_ARGUMENT is always BAD_REQUEST
REASONS = {
    "append before open": pb.OUT_OF_ORDER, "close before open": pb.OUT_OF_ORDER, "second open": pb.OUT_OF_ORDER,
    "model id mismatch": pb.MODEL_MISMATCH, "open dim mismatch": pb.MODEL_MISMATCH,
    "unknown session": pb.SESSION_NOT_FOUND,
    "history over the sentence limit": pb.SESSION_FULL, "too many sentences": pb.SESSION_FULL,
    "oversized message": pb.ERROR_REASON_UNSPECIFIED,  # refused by gRPC's own size limit, not by the service
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gets_a_precise_status(server, name):
    messages, code, words = BAD_INPUTS[name]
    raw = bool(messages) and isinstance(messages[0], bytes)
    replies, got, details, reason = converse_raw(_target(server), messages, raw=raw, with_reason=True)
    assert (got, words in details) == (code, True), (got, details)
    assert name in REASONS or code == C.INVALID_ARGUMENT
    assert reason == REASONS.get(name, pb.BAD_REQUEST), (pb.ErrorReason.Name(reason), details)
    sent_ids = [m.open.session_id for m in messages if not isinstance(m, bytes) and m.WhichOneof("kind") == "open"]
    assert not any(i and i in details for i in sent_ids), details  # ids never come back in messages
    if name != "oversized message":  # (grpc core refuses that one as it arrives: replies may be cut short)
        assert len(replies) == max(0, len(messages) - 1)  # every message before the bad one was answered


def test_bad_inputs_leave_no_trace_and_others_unaffected(server, cloud_model):
    """A good conversation runs while every bad input above hits the server from other threads."""
    v = _vec(6, seed=1)
    ref = reference_outputs(cloud_model, v)[0]
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            for messages, _, _ in BAD_INPUTS.values():
                converse_raw(_target(server), messages, raw=bool(messages) and isinstance(messages[0], bytes))

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        with CloudClient(_target(server)) as c, c.conversation(MODEL_ID, D) as conv:
            np.testing.assert_allclose(conv.append(v[:3]).hidden, ref[2], atol=1e-5, rtol=0)
            for k in range(3, 6):
                np.testing.assert_allclose(conv.append(v[k]).hidden, ref[k], atol=1e-5, rtol=0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert _quiet(server)
    assert server.batcher.alive


def _quiet(server, timeout=3.0) -> bool:
    """No session left and the KV accounting consistent."""
    end = time.monotonic() + timeout
    while True:
        st = server.store.stats()
        ok = st["sessions"] == 0 and st["kv_bytes"] == 0 and server.store.sentences_in_use == 0
        if ok or time.monotonic() > end:
            return ok
        time.sleep(0.01)


# -- property-based fuzz of request messages ------------------------------------------------------
_ids = st.sampled_from(["", "a", "held-id", "x" * 129, "bad id", "é"]) | st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_good_vectors = st.builds(lambda n, seed, dt: pack(_vec(n, seed), dt), st.integers(1, 4), st.integers(0, 99),
                          st.sampled_from(["float32", "float16"]))
_any_vectors = _good_vectors | st.builds(
    pb.Vectors, data=st.binary(max_size=300), dtype=st.integers(0, 4),
    dim=st.sampled_from([0, 1, 16, D, D + 1, 2**32 - 1]), count=st.sampled_from([0, 1, 2, 9, 2**32 - 1]))
_any_open = st.builds(lambda mid, dim, sid, hist, rd: _open(model_id=mid, dim=dim, session_id=sid, reply_dtype=rd,
                                                            **({"history": hist} if hist is not None else {})),
                      st.sampled_from([MODEL_ID, "", "other"]), st.sampled_from([D, 0, 31, 2**32 - 1]),
                      _ids, st.none() | _any_vectors, st.integers(0, 3))
_good_open = st.builds(lambda hist, rd: _open(reply_dtype=rd, **({"history": hist} if hist is not None else {})),
                       st.none() | _good_vectors, st.sampled_from([0, 1, 2]))
_opens = st.one_of(_good_open, _any_open)
_good_append = st.builds(lambda v: pb.ClientMessage(append=pb.Append(vectors=v)), _good_vectors)
_messages = st.one_of(
    _good_append,
    st.builds(lambda v: pb.ClientMessage(append=pb.Append(vectors=v)), _any_vectors),
    st.builds(lambda keep: pb.ClientMessage(close=pb.Close(keep=keep)), st.booleans()),
    _opens,
    st.just(pb.ClientMessage()))
_ALLOWED = {C.OK, C.INVALID_ARGUMENT, C.FAILED_PRECONDITION, C.NOT_FOUND, C.RESOURCE_EXHAUSTED}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(first=_good_open | st.none() | _any_open, valid=st.lists(_good_append, max_size=3),
       rest=st.lists(_messages, max_size=4), garbage=st.none() | st.binary(max_size=64))
def test_fuzzed_requests_get_clean_statuses(server, first, valid, rest, garbage):
    """Any sequence of messages (a mostly valid start, then anything) ends with OK or a client-error
    status, never INTERNAL/UNKNOWN; replies are well formed; no attached session or KV byte leaks."""
    sequence = ([first] if first is not None else []) + valid + rest
    if garbage is not None:  # raw bytes: a ClientMessage or not
        _, code, details = converse_raw(_target(server), [garbage], raw=True, timeout=10)
        assert code in _ALLOWED, (code, details)
    replies, code, details = converse_raw(_target(server), sequence, timeout=10)
    assert code in _ALLOWED, (code, details)
    event(f"status {code.name}")
    event(f"step replies: {min(2, sum(r.WhichOneof('kind') == 'step' for r in replies))}")
    for r in replies:
        assert r.WhichOneof("kind") in ("opened", "step", "closed")
        if r.WhichOneof("kind") == "step":
            assert np.isfinite(np.frombuffer(r.step.hidden.data, np.float32 if r.step.hidden.dtype == 1
                                             else np.float16)).all()
    # detached sessions (Close{keep: true}) may stay; nothing attached, accounting consistent
    end = time.monotonic() + 3
    while server.store.stats()["attached_sessions"] and time.monotonic() < end:
        time.sleep(0.01)
    with server.store.lock:
        held = list(server.store.sessions.values())
        assert not any(s.attached for s in held)
        assert server.store.sentences_in_use == sum(s.length for s in held)
        assert all(s.kv is not None and s.kv.length == s.length for s in held)
    server.store.free_all("test cleanup")


# -- limits -------------------------------------------------------------------------------------------
def test_max_sessions_evicts_detached_first_then_refuses(cloud_bundle):
    with running_server(cloud_bundle, max_sessions=2) as srv, CloudClient(_target(srv)) as c:
        a = c.conversation(MODEL_ID, D)
        a.append(_vec(2))
        a.close(keep=True)  # detached: evictable
        b = c.conversation(MODEL_ID, D)
        c2 = c.conversation(MODEL_ID, D)  # evicts a
        with pytest.raises(CloudError) as e:
            c.conversation(MODEL_ID, D)
        assert e.value.code == C.RESOURCE_EXHAUSTED and "maximum of 2 sessions" in e.value.details
        assert e.value.reason == pb.SERVER_FULL
        with pytest.raises(CloudError) as e:
            c.conversation(MODEL_ID, D, session_id=a.session_id)
        assert e.value.code == C.NOT_FOUND and "evicted to make room for a new session" in e.value.details
        assert e.value.reason == pb.SESSION_NOT_FOUND
        b.close()
        c2.close()
        assert c.stats().sessions_evicted_total == 1


def test_kv_budget_evicts_detached_then_refuses(cloud_bundle):
    per = 2 * 2 * D * 4  # layers * (k, v) * d * float32
    with running_server(cloud_bundle, kv_budget_bytes=10 * per) as srv, CloudClient(_target(srv)) as c:
        assert c.model_info().kv_bytes_per_sentence == per
        old = c.conversation(MODEL_ID, D)
        old.append(_vec(4))
        old.close(keep=True)
        live = c.conversation(MODEL_ID, D)
        live.append(_vec(6))  # 4 + 6 = 10: full
        live.append(_vec(1))  # needs room: the detached session goes
        assert c.stats().sessions == 1 and c.stats().kv_bytes == 7 * per
        other = c.conversation(MODEL_ID, D)
        other.append(_vec(3))
        with pytest.raises(CloudError) as e:
            other.append(_vec(1))
        assert e.value.code == C.RESOURCE_EXHAUSTED and "KV cache budget" in e.value.details
        assert e.value.reason == pb.SERVER_FULL
        np.testing.assert_allclose(live.append(_vec(1, seed=5)).hidden.shape, (D,))  # live one unaffected
        live.close()
        assert c.stats().kv_bytes == 0 and c.stats().sessions_evicted_total == 1


def test_idle_timeout_frees_detached_and_ends_idle_streams(cloud_bundle):
    with running_server(cloud_bundle, idle_timeout_s=0.4) as srv, CloudClient(_target(srv)) as c:
        detached = c.conversation(MODEL_ID, D)
        detached.append(_vec(2))
        detached.close(keep=True)
        idle = c.conversation(MODEL_ID, D)
        idle.append(_vec(2))
        end = time.monotonic() + 3
        while c.stats().sessions and time.monotonic() < end:
            time.sleep(0.02)
        assert c.stats().sessions == 0 and c.stats().sessions_evicted_total == 2
        with pytest.raises(CloudError) as e:
            c.conversation(MODEL_ID, D, session_id=detached.session_id)
        assert e.value.code == C.NOT_FOUND and "idle for more than 0.4 s" in e.value.details
        assert e.value.reason == pb.SESSION_NOT_FOUND
        with pytest.raises(CloudError) as e:
            idle.append(_vec(1))
        assert e.value.code == C.RESOURCE_EXHAUSTED and "idle for more than 0.4 s" in e.value.details
        assert e.value.reason == pb.SESSION_IDLE


def test_resume_conflicts(server):
    with CloudClient(_target(server)) as c:
        conv = c.conversation(MODEL_ID, D)
        conv.append(_vec(3))
        with pytest.raises(CloudError) as e:  # still attached to the open stream
            c.conversation(MODEL_ID, D, session_id=conv.session_id)
        assert e.value.code == C.FAILED_PRECONDITION and "attached to another open stream" in e.value.details
        assert e.value.reason == pb.SESSION_ATTACHED
        conv.close(keep=True)
        with pytest.raises(CloudError) as e:  # history of another length than what is held
            c.conversation(MODEL_ID, D, session_id=conv.session_id, history=_vec(2))
        assert e.value.code == C.FAILED_PRECONDITION and "holds 3 sentences but open.history has 2" in e.value.details
        assert e.value.reason == pb.HISTORY_MISMATCH
        # a refused Open leaves the held session alone: it still resumes
        with c.conversation(MODEL_ID, D, session_id=conv.session_id, history=_vec(3)) as again:
            assert again.resumed and again.past_length == 3
    assert _quiet(server)

"""The cloud service against a real gRPC server on 127.0.0.1 (tiny random model, no training):
outputs equal the torch reference, concurrent clients equal one-by-one, sessions are freed
on cancel / deadline, resume and rebuild, graceful shutdown, health, reflection, metrics."""
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from cloud_helpers import MODEL_ID, D, reference_outputs, running_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sllm.protos.client import CloudClient, CloudError


@pytest.fixture(scope="module")
def server(cloud_bundle):
    with running_server(cloud_bundle, batch_wait_ms=2.0) as srv:
        yield srv


def _client(server, **kw) -> CloudClient:
    return CloudClient(f"127.0.0.1:{server.port}", **kw)


def _vectors(n, seed):
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def _wait_for(cond, timeout=3.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def _assert_step(step, ref, k, atol=1e-5):
    h, p, stop = ref
    np.testing.assert_allclose(step.hidden, h[k], atol=atol, rtol=0)
    assert step.stop == bool(stop[k]) and abs(step.stop_probability - p[k]) < max(atol, 1e-6)
    assert step.past_length == k + 1


def test_outputs_equal_torch_reference(server, cloud_model):
    """Prompt (3 sentences in one message), 4 generated-sentence steps, a second user turn
    (2 sentences) and 2 more steps on one stream == one full forward over the same vectors."""
    v = _vectors(11, seed=1)
    ref = reference_outputs(cloud_model, v)
    assert ref[2].any() and not ref[2].all()  # both stop decisions occur in this sequence
    with _client(server) as c:
        info = c.model_info()
        assert (info.model_id, info.dim, info.max_sentences) == (MODEL_ID, D, 64)
        with c.conversation(info.model_id, info.dim) as conv:
            assert conv.past_length == 0 and not conv.resumed and conv.remaining_sentences == 64
            _assert_step(conv.append(v[:3]), ref, 2)
            for k in range(3, 7):
                _assert_step(conv.append(v[k]), ref, k)
            _assert_step(conv.append(v[7:9]), ref, 8)
            for k in (9, 10):
                _assert_step(conv.append(v[k]), ref, k)


def test_float16_on_the_wire(server, cloud_model):
    v = _vectors(5, seed=2)
    v16 = v.astype(np.float16).astype(np.float32)
    h = reference_outputs(cloud_model, v16)[0]
    with _client(server) as c, c.conversation(MODEL_ID, D, dtype="float16", reply_dtype="float16") as conv:
        np.testing.assert_allclose(conv.append(v[:4]).hidden, h[3], atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(conv.append(v[4]).hidden, h[4], atol=2e-3, rtol=2e-3)


def _conversation(server, vectors, barrier=None):
    """prompt (2 sentences) then one step per remaining vector; the (hidden, stop, p) of each."""
    out = []
    with _client(server) as c, c.conversation(MODEL_ID, D) as conv:
        for chunk in [vectors[:2]] + [vectors[k] for k in range(2, len(vectors))]:
            if barrier is not None:
                barrier.wait(timeout=20)  # all clients step together: the server sees them at once
            s = conv.append(chunk)
            out.append((s.hidden, s.stop, s.stop_probability))
    return out


def test_concurrent_clients_equal_one_by_one(server):
    n = 16
    inputs = [_vectors(6 + i % 3, seed=100 + i) for i in range(n)]  # different lengths
    one_by_one = [_conversation(server, v) for v in inputs]
    before = server.service.stats()
    results, errors = [None] * n, []

    def run(i):
        try:
            results[i] = _conversation(server, inputs[i], barrier if len(inputs[i]) == 8 else None)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
            barrier.abort()

    # the 6 clients with 8 vectors step in lockstep; the rest run freely alongside
    barrier = threading.Barrier(sum(len(v) == 8 for v in inputs))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    worst = 0.0
    for got, want in zip(results, one_by_one):
        assert len(got) == len(want)
        for (h, stop, p), (h1, stop1, p1) in zip(got, want):
            worst = max(worst, float(np.abs(h - h1).max()))
            assert stop == stop1 and abs(p - p1) < 1e-5
    assert worst < 1e-5
    print(f"max |batched - one by one| = {worst:.3g}")
    after = server.service.stats()
    batched_passes = {k: v - before["batch_size_histogram"].get(k, 0) for k, v in after["batch_size_histogram"].items()}
    assert any(size > 1 and count for size, count in batched_passes.items()), batched_passes
    assert after["sessions"] == 0 and after["kv_bytes"] == 0


def test_cancel_mid_stream_frees_the_session(cloud_bundle):
    with running_server(cloud_bundle) as srv, _client(srv) as c:
        conv = c.conversation(MODEL_ID, D)
        conv.append(_vectors(5, seed=3))
        conv.append(_vectors(1, seed=4))
        st = c.stats()
        assert (st.sessions, st.attached_sessions) == (1, 1)
        assert st.kv_bytes == 6 * srv.engine.kv_bytes_per_sentence > 0
        conv.cancel()
        assert _wait_for(lambda: c.stats().sessions == 0)
        st = c.stats()
        assert st.kv_bytes == 0 and srv.store.sentences_in_use == 0
        with pytest.raises(CloudError, match=r"no longer held \((its stream ended|the client ended its stream)"):  # gone for good
            c.conversation(MODEL_ID, D, session_id=conv.session_id)


def test_deadline_ends_the_stream_and_frees_the_session(cloud_bundle):
    with running_server(cloud_bundle) as srv, _client(srv) as c:
        t0 = time.monotonic()
        conv = c.conversation(MODEL_ID, D, timeout=1.0)
        conv.append(_vectors(3, seed=5))
        time.sleep(max(0.0, t0 + 1.05 - time.monotonic()))  # past the stream's deadline
        with pytest.raises(CloudError) as e:
            conv.append(_vectors(1, seed=6))
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _wait_for(lambda: c.stats().sessions == 0) and c.stats().kv_bytes == 0


def test_close_keep_resume_and_rebuild_from_history(server, cloud_model):
    v = _vectors(8, seed=7)
    ref = reference_outputs(cloud_model, v)
    with _client(server) as c:
        conv = c.conversation(MODEL_ID, D)
        conv.append(v[:3])
        last = conv.append(v[3])
        assert conv.close(keep=True) is True
        st = c.stats()
        assert (st.sessions, st.attached_sessions) == (1, 0)
        # resume by id: nothing recomputed, the last step comes back, the cache goes on
        with c.conversation(MODEL_ID, D, session_id=conv.session_id) as again:
            assert again.resumed and again.past_length == 4
            np.testing.assert_array_equal(again.last.hidden, last.hidden)
            _assert_step(again.append(v[4]), ref, 4)
            again.close(keep=True)
        # resume with the full history while still held: resumed, not recomputed
        with c.conversation(MODEL_ID, D, session_id=conv.session_id, history=v[:5]) as held:
            assert held.resumed and held.past_length == 5
        assert c.stats().sessions == 0  # that one closed without keep
        # rebuild (e.g. on another replica) under a chosen id from the history
        with c.conversation(MODEL_ID, D, session_id="edge-42.turn:1", history=v[:6]) as rebuilt:
            assert not rebuilt.resumed and rebuilt.session_id == "edge-42.turn:1" and rebuilt.past_length == 6
            _assert_step(rebuilt.last, ref, 5)
            _assert_step(rebuilt.append(v[6:8]), ref, 7)
        # a new session from history, id chosen by the server
        with c.conversation(MODEL_ID, D, history=v[:2]) as fresh:
            assert len(fresh.session_id) == 32 and fresh.past_length == 2
            _assert_step(fresh.last, ref, 1)
        assert c.stats().sessions == 0


def test_graceful_shutdown_drains_open_streams(cloud_bundle, cloud_model):
    v = _vectors(4, seed=8)
    ref = reference_outputs(cloud_model, v)
    with running_server(cloud_bundle) as srv, _client(srv) as c:
        conv = c.conversation(MODEL_ID, D)
        _assert_step(conv.append(v[:2]), ref, 1)
        t0 = time.monotonic()
        stopper = threading.Thread(target=srv.stop, kwargs={"grace": 120.0})
        stopper.start()
        assert _wait_for(lambda: srv.service.draining)
        with pytest.raises(CloudError) as e:  # no new conversations while draining
            c.conversation(MODEL_ID, D, timeout=5)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        _assert_step(conv.append(v[2]), ref, 2)  # the open stream still gets its steps
        _assert_step(conv.append(v[3]), ref, 3)
        conv.close()
        stopper.join(timeout=60)
        # done when the stream closed, long before the 120 s grace (loose bound: CI machines are slow)
        assert not stopper.is_alive() and time.monotonic() - t0 < 60
        assert srv.store.stats()["sessions"] == 0 and not srv.batcher.alive


def test_shutdown_cancels_streams_left_open_after_the_grace_period(cloud_bundle):
    with running_server(cloud_bundle) as srv, _client(srv) as c:
        conv = c.conversation(MODEL_ID, D)
        conv.append(_vectors(2, seed=9))
        t0 = time.monotonic()
        srv.stop(grace=0.3)
        assert time.monotonic() - t0 < 3
        with pytest.raises(CloudError) as e:
            conv.append(_vectors(1, seed=10))
        assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert srv.store.stats() == {"sessions": 0, "attached_sessions": 0, "kv_bytes": 0,
                                     "kv_budget_bytes": srv.config.kv_budget_bytes}


def test_health_and_reflection(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "sllm.v1.SentenceLM"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = list(refl.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="sllm.v1.SentenceLM")]), timeout=5))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"sllm.v1.SentenceLM", "grpc.health.v1.Health"} <= names
        assert replies[1].file_descriptor_response.file_descriptor_proto


def test_stats_and_prometheus_metrics(cloud_bundle):
    with running_server(cloud_bundle, metrics_port=0, max_batch=1) as srv, _client(srv) as c:
        with c.conversation(MODEL_ID, D) as conv:
            conv.append(_vectors(3, seed=11))
            conv.append(_vectors(1, seed=12))
        st = c.stats()
        assert (st.steps_total, st.sentences_total, st.forward_passes_total) == (2, 4, 2)
        assert st.sessions_opened_total == 1 and dict(st.batch_size_histogram) == {1: 2}
        assert st.steps_per_second > 0 and st.mean_batch_size == 1.0
        assert not c.model_info().batching and c.model_info().max_batch == 1
        url = f"http://127.0.0.1:{srv.metrics_http.port}"
        text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        assert "sllm_cloud_steps_total 2\n" in text and 'sllm_cloud_batch_size_passes_total{size="1"} 2' in text
        assert "# TYPE sllm_cloud_kv_bytes gauge" in text
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(url + "/nope", timeout=5)


def test_failed_conversations_leave_no_client_threads(server):
    with _client(server) as c:
        c.conversation(MODEL_ID, D).close()  # warm up grpc's own threads
        before = threading.active_count()
        for _ in range(8):
            with pytest.raises(CloudError, match="model mismatch"):
                c.conversation("sllm-other", D)
        assert _wait_for(lambda: threading.active_count() <= before)

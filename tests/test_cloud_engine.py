"""The batched forward over per-session KV slots equals each session alone and the full forward."""
import numpy as np
import pytest
import torch
from cloud_helpers import reference_outputs

from sllm.cloud.engine import Engine
from sllm.modeling.cloud_bundle import random_grafted_opt


@pytest.fixture(scope="module")
def model():
    return random_grafted_opt(d=32, layers=3, heads=4, max_sentences=64)


def _keep(slots, news) -> None:
    for slot, new in zip(slots, news):
        slot.length += len(new)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("short_context", [0, 64], ids=["per-slot-attention", "padded-past"])
def test_batched_sessions_equal_unbatched_and_full_forward(model, short_context, backend, monkeypatch):
    # steps of one new sentence per session below SHORT_CONTEXT gather every past into one padded batch
    # (modeling.opt_block.PaddedPast, or cloud.onnx_step's padded batch); at 0 every step attends over each
    # slot's own views; "auto" runs the one-session and short batched steps in ONNX Runtime
    monkeypatch.setattr("sllm.modeling.opt_graft.SHORT_CONTEXT", short_context)
    monkeypatch.setattr("sllm.cloud.onnx_step.SHORT_CONTEXT", short_context)
    engine = Engine(model, backend=backend)
    assert (engine.onnx is not None) == (backend == "auto")
    rng = np.random.default_rng(0)
    # four sessions, each fed in its own chunks: prefills of several sentences and single steps,
    # so one batch mixes different past lengths and different numbers of new sentences
    chunks = [[2, 1, 1, 3, 1], [1, 1], [4, 1, 1], [1, 5, 1, 1, 2]]
    seqs = [rng.standard_normal((sum(c), 32)).astype(np.float32) for c in chunks]
    refs = [reference_outputs(model, s) for s in seqs]
    batched, alone = [engine.new_slot() for _ in range(4)], [engine.new_slot() for _ in range(4)]
    for r in range(max(map(len, chunks))):
        active = [i for i in range(4) if r < len(chunks[i])]
        news = [seqs[i][batched[i].length:batched[i].length + chunks[i][r]] for i in active]
        outs = engine.forward([batched[i] for i in active], news)
        _keep([batched[i] for i in active], news)
        for i, new, out in zip(active, news, outs):
            one = engine.forward([alone[i]], [new])[0]
            alone[i].length += len(new)
            n = batched[i].length
            h_ref, p_ref, stop_ref = refs[i][0][n - 1], refs[i][1][n - 1], refs[i][2][n - 1]
            np.testing.assert_allclose(out.hidden, one.hidden, atol=1e-5, rtol=0)
            np.testing.assert_allclose(out.hidden, h_ref, atol=1e-5, rtol=0)
            assert abs(out.stop_probability - p_ref) < 1e-5 and out.stop == bool(stop_ref) == one.stop
            kv = batched[i].valid()
            assert kv.shape == (3, 2, 4, n, 8)
            np.testing.assert_allclose(kv.numpy(), alone[i].valid().numpy(), atol=1e-5, rtol=0)
    assert engine.kv_bytes(10) == 10 * 2 * 3 * 32 * 4


def test_slots_grow_rarely_and_keep_their_contents(model):
    engine = Engine(model)
    rng = np.random.default_rng(2)
    seq = rng.standard_normal((40, 32)).astype(np.float32)
    slot, buffers = engine.new_slot(), set()
    for t in range(40):
        engine.forward([slot], [seq[t:t + 1]])
        slot.length += 1
        buffers.add(slot.buf.data_ptr())
    assert slot.capacity == 48 and len(buffers) <= 3  # 16, 32, 48: a page at a time, not a buffer per step
    np.testing.assert_allclose(engine.forward([slot], [seq[:1]])[0].hidden,
                               reference_outputs(model, np.concatenate([seq, seq[:1]]))[0][-1], atol=1e-5, rtol=0)


def test_an_unkept_step_and_a_truncation_leave_the_session_as_before(model):
    engine = Engine(model)
    rng = np.random.default_rng(3)
    seq = rng.standard_normal((6, 32)).astype(np.float32)
    other = rng.standard_normal((3, 32)).astype(np.float32)
    slot = engine.new_slot()
    engine.forward([slot], [seq[:4]])
    slot.length = 4
    engine.forward([slot], [other])  # computed, not kept (a cancelled step)
    slot.length += 3  # ... or kept, then rolled back (speculation)
    slot.truncate(4)
    out = engine.forward([slot], [seq[4:]])[0]
    np.testing.assert_allclose(out.hidden, reference_outputs(model, seq)[0][-1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        slot.truncate(5)


def test_a_row_that_overflows_does_not_touch_its_neighbours(model):
    engine = Engine(model)
    rng = np.random.default_rng(1)
    good = rng.standard_normal((3, 32)).astype(np.float32)
    huge = np.full((1, 32), 3e38, np.float32)
    h_ref = reference_outputs(model, good)[0][-1]
    outs = engine.forward([engine.new_slot(), engine.new_slot()], [good, huge])
    assert outs[0].finite and not outs[1].finite
    np.testing.assert_allclose(outs[0].hidden, h_ref, atol=1e-5, rtol=0)


def test_a_step_past_the_model_positions_is_refused(model):
    engine = Engine(model)
    slot = engine.new_slot()
    with pytest.raises(ValueError, match="positions"):
        engine.forward([slot], [np.zeros((65, 32), np.float32)])
    assert slot.length == 0 and torch.is_tensor(slot.valid())


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_an_overflow_in_a_padded_batch_leaves_nothing_for_the_next(model, backend):
    # one new sentence per session over short contexts: the padded batch (modeling.opt_block.PaddedPast, or
    # cloud.onnx_step's) is kept between steps, so the overflowing row's keys/values stay in it; the next
    # steps pad over them. The row is finite but overflows in the first LayerNorm (not a constant one: ONNX
    # Runtime's LayerNorm maps that to zeros, finite)
    engine = Engine(model, backend=backend)
    rng = np.random.default_rng(4)
    seq = rng.standard_normal((6, 32)).astype(np.float32)
    a, b = engine.new_slot(), engine.new_slot()
    engine.forward([a], [seq[:3]])
    a.length = 3
    outs = engine.forward([a, b], [seq[3:4], np.tile(np.float32([3e38, -3e38]), (1, 16))])
    assert outs[0].finite and not outs[1].finite
    a.length = 4  # a's step kept, b's not
    for t in (4, 5):
        outs = engine.forward([a, b], [seq[t:t + 1], seq[:1]])
        a.length += 1
        assert outs[0].finite and outs[1].finite
        np.testing.assert_allclose(outs[0].hidden, reference_outputs(model, seq[:t + 1])[0][-1], atol=1e-5, rtol=0)
        np.testing.assert_allclose(outs[1].hidden, reference_outputs(model, seq[:1])[0][-1], atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
@pytest.mark.parametrize("dtype,atol", [("float32", 1e-3), ("bfloat16", 0.15)])
def test_cuda_engine_equals_the_cpu_reference(dtype, atol):
    """The engine on a GPU (torch for every pass): prefills and single steps of sessions at different
    lengths, batched, against the full forward on the CPU; the stop flag agrees away from ties."""
    model = random_grafted_opt(d=64, layers=2, heads=4, max_sentences=64)
    engine = Engine(random_grafted_opt(d=64, layers=2, heads=4, max_sentences=64), "cuda", dtype)
    engine.model.load_state_dict(model.state_dict())
    assert engine.onnx is None
    rng = np.random.default_rng(5)
    seqs = [rng.standard_normal((n, 64)).astype(np.float32) for n in (9, 4, 14)]
    slots = [engine.new_slot() for _ in seqs]
    chunks = [[3, 1, 1, 4], [1, 2, 1], [5, 1, 1, 1, 6]]
    for r in range(max(map(len, chunks))):
        active = [i for i in range(3) if r < len(chunks[i])]
        news = [seqs[i][slots[i].length:slots[i].length + chunks[i][r]] for i in active]
        outs = engine.forward([slots[i] for i in active], news)
        for i, new, out in zip(active, news, outs):
            slots[i].length += len(new)
            h_ref, p_ref, _ = (x[slots[i].length - 1] for x in reference_outputs(model, seqs[i]))
            assert out.finite
            np.testing.assert_allclose(out.hidden, h_ref, atol=atol * max(1.0, float(np.abs(h_ref).max())), rtol=0)
            if abs(p_ref - 0.5) > 0.05:
                assert out.stop == (p_ref > 0.5)

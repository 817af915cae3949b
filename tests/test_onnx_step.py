"""The cloud step in ONNX Runtime (cloud.onnx_step) equals the torch step: outputs and the keys/values it
writes into the slots, on the steps it takes; the others stay in torch."""
import numpy as np
import pytest
import torch

from sllm.cloud.engine import Engine
from sllm.cloud.onnx_step import BATCH_MAX_POSITIONS, BATCH_MAX_SESSIONS, SINGLE_MAX_CONTEXT, OnnxSteps
from sllm.modeling.cloud_bundle import load_cloud_bundle, random_grafted_opt
from sllm.modeling.opt_block import SHORT_CONTEXT


@pytest.fixture(scope="module")
def model():
    return random_grafted_opt(d=64, layers=2, heads=4, max_sentences=SINGLE_MAX_CONTEXT + 8)


def _twins(a: Engine, b: Engine, lengths: list[int], rng) -> tuple[list, list]:
    """Slots of the same random past in each engine."""
    sa, sb = [], []
    for n in lengths:
        x, y = a.new_slot(), b.new_slot()
        if n:
            x.reserve(n), y.reserve(n)
            x.length = y.length = n
            x.valid().copy_(torch.from_numpy(rng.standard_normal(x.valid().shape).astype(np.float32)))
            y.valid().copy_(x.valid())
        sa.append(x), sb.append(y)
    return sa, sb


# (past lengths, new sentences per session), each with the path it must take
CASES = {
    "prefill of one session": ([0], [5], True),
    "one sentence after a short past": ([7], [1], True),
    "several after a past": ([9], [3], True),
    "one session at the limit": ([SINGLE_MAX_CONTEXT - 1], [1], True),
    "one session past the limit": ([SINGLE_MAX_CONTEXT], [1], False),
    "a batch of different pasts, one empty": ([3, 9, 1, 0], [1, 1, 1, 1], True),
    "a batch at the short-context limit": ([SHORT_CONTEXT - 1, 2], [1, 1], True),
    "a batch past the short-context limit": ([SHORT_CONTEXT, 2], [1, 1], False),
    "a batch of several new sentences": ([3, 5], [2, 1], False),
    "too many sessions": ([1] * (BATCH_MAX_SESSIONS + 1), [1] * (BATCH_MAX_SESSIONS + 1), False),
    "too many positions": ([BATCH_MAX_POSITIONS // 4] * 4, [1] * 4, False),
}


@pytest.mark.parametrize("case", CASES)
def test_onnx_steps_equal_torch(model, case):
    lengths, sizes, on_onnx = CASES[case]
    auto, plain = Engine(model), Engine(model, backend="torch")
    assert plain.onnx is None and auto.onnx is not None
    rng = np.random.default_rng(len(case))
    slots_a, slots_t = _twins(auto, plain, lengths, rng)
    assert OnnxSteps.handles(slots_a, sizes) == on_onnx
    news = [rng.standard_normal((T, model.hidden_size)).astype(np.float32) for T in sizes]
    out_a, out_t = auto.forward(slots_a, news), plain.forward(slots_t, news)
    for a, t, sa, st, T in zip(out_a, out_t, slots_a, slots_t, sizes):
        assert a.finite and t.finite
        np.testing.assert_allclose(a.hidden, t.hidden, atol=2e-5, rtol=0)
        np.testing.assert_allclose(a.stop_logits, t.stop_logits, atol=2e-5, rtol=0)
        # the new keys/values are in the slot, after a past it left untouched
        n = sa.length + T
        np.testing.assert_allclose(sa.buf[:, :, :, :n].numpy(), st.buf[:, :, :, :n].numpy(), atol=2e-5, rtol=0)
        assert sa.length == st.length  # the caller keeps a step, not the engine


def test_greedy_conversation_at_the_bundled_model_matches_torch():
    """models/default's blocks, one session fed one sentence at a time (the edge's loop), then a batch
    of it and three others: every step on both backends, the outputs the edge would decode from."""
    model, _ = load_cloud_bundle("models/default/cloud")
    auto, plain = Engine(model), Engine(model, backend="torch")
    rng = np.random.default_rng(0)
    a, t = auto.new_slot(), plain.new_slot()
    worst = 0.0
    for step in range(12):
        new = rng.standard_normal((3 if step == 0 else 1, model.hidden_size)).astype(np.float32)
        oa, ot = auto.forward([a], [new])[0], plain.forward([t], [new])[0]
        a.length += len(new)
        t.length += len(new)
        worst = max(worst, float(np.abs(oa.hidden - ot.hidden).max()))
        assert oa.stop == ot.stop
    others_a, others_t = _twins(auto, plain, [0, 4, 30], rng)
    news = [rng.standard_normal((1, model.hidden_size)).astype(np.float32) for _ in range(4)]
    assert OnnxSteps.handles([a, *others_a], [1] * 4)
    for oa, ot in zip(auto.forward([a, *others_a], news), plain.forward([t, *others_t], news)):
        worst = max(worst, float(np.abs(oa.hidden - ot.hidden).max()))
    assert worst < 1e-4


def test_a_half_precision_engine_keeps_torch():
    own = random_grafted_opt(d=32, layers=1, heads=4, max_sentences=16)  # Engine casts the model it is given
    assert Engine(own, dtype="bfloat16").onnx is None  # ONNX Runtime's step is float32 on a CPU
    with pytest.raises(ValueError, match="backend"):
        Engine(own, backend="onnx-only")

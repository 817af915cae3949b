"""The batched forward over per-session KV caches equals each session alone and the full forward."""
import numpy as np
import pytest
from cloud_helpers import reference_outputs

from cloud.engine import Engine
from modeling.cloud_bundle import random_grafted_opt


@pytest.fixture(scope="module")
def model():
    return random_grafted_opt(d=32, layers=3, heads=4, max_sentences=64)


def test_batched_sessions_equal_unbatched_and_full_forward(model):
    engine = Engine(model)
    rng = np.random.default_rng(0)
    # four sessions, each fed in its own chunks: prefills of several sentences and single steps,
    # so one batch mixes different past lengths (left-padded cache) and new lengths (left-padded input)
    chunks = [[2, 1, 1, 3, 1], [1, 1], [4, 1, 1], [1, 5, 1, 1, 2]]
    seqs = [rng.standard_normal((sum(c), 32)).astype(np.float32) for c in chunks]
    refs = [reference_outputs(model, s) for s in seqs]
    batched_kv, alone_kv, pos = [None] * 4, [None] * 4, [0] * 4
    for r in range(max(map(len, chunks))):
        active = [i for i in range(4) if r < len(chunks[i])]
        news = [seqs[i][pos[i]:pos[i] + chunks[i][r]] for i in active]
        batched = engine.forward([batched_kv[i] for i in active], news)
        for i, new, out in zip(active, news, batched):
            alone = engine.forward([alone_kv[i]], [new])[0]
            pos[i] += len(new)
            h_ref, p_ref, stop_ref = refs[i][0][pos[i] - 1], refs[i][1][pos[i] - 1], refs[i][2][pos[i] - 1]
            np.testing.assert_allclose(out.hidden, alone.hidden, atol=1e-5, rtol=0)
            np.testing.assert_allclose(out.hidden, h_ref, atol=1e-5, rtol=0)
            assert abs(out.stop_probability - p_ref) < 1e-5 and out.stop == bool(stop_ref) == alone.stop
            assert out.kv.shape == (3, 2, 4, pos[i], 8)
            np.testing.assert_allclose(out.kv.numpy(), alone.kv.numpy(), atol=1e-5, rtol=0)
            batched_kv[i], alone_kv[i] = out.kv, alone.kv
    assert engine.kv_bytes(10) == 10 * 2 * 3 * 32 * 4


def test_a_row_that_overflows_does_not_touch_its_neighbours(model):
    engine = Engine(model)
    rng = np.random.default_rng(1)
    good = rng.standard_normal((3, 32)).astype(np.float32)
    huge = np.full((1, 32), 3e38, np.float32)
    h_ref = reference_outputs(model, good)[0][-1]
    outs = engine.forward([None, None], [good, huge])
    assert outs[0].finite and not outs[1].finite and outs[1].kv is None
    np.testing.assert_allclose(outs[0].hidden, h_ref, atol=1e-5, rtol=0)

"""KV memory follows the accounting: under random appends, rollbacks, guesses (kept, dropped, rolled back
while in flight) and accepts, every slot holds the pages of its session's sentences and no more, and
what it holds is exactly what a session stepped from scratch would hold."""
import numpy as np
from cloud_helpers import reference_outputs

from sllm.cloud.engine import Engine
from sllm.cloud.metrics import Metrics
from sllm.cloud.sessions import SessionStore
from sllm.modeling.cloud_bundle import random_grafted_opt
from sllm.modeling.opt_block import KVSlot

D, MAX = 32, 64


def test_slots_hold_the_pages_of_their_sentences_under_any_appends_and_rollbacks():
    model = random_grafted_opt(d=D, layers=2, heads=4, max_sentences=MAX)
    engine = Engine(model)
    per = engine.kv_bytes_per_sentence
    store = SessionStore(max_sessions=4, max_sentences=MAX, idle_timeout_s=1e9, kv_budget_bytes=1 << 30,
                         kv_bytes_per_sentence=per, metrics=Metrics(), new_slot=engine.new_slot)
    sessions = [store.acquire("owner", None, None, None)[0] for _ in range(3)]
    fed = {s.id: [] for s in sessions}  # the vectors each session holds, in order
    rng = np.random.default_rng(0)
    for _ in range(400):
        s = sessions[rng.integers(len(sessions))]
        s.speculate = 4
        op = rng.random()
        if op < 0.45 and s.length < MAX - 4:  # the edge appends, after rolling back to a confirmed position
            position = int(rng.integers(max(0, s.confirmed - 20), s.confirmed + 1))
            store.truncate(s, position)
            del fed[s.id][position:]
            new = rng.standard_normal((int(rng.integers(1, 5)), D)).astype(np.float32)
            store.reserve(s, len(new))
            out = engine.forward([s.kv], [new])[0]
            store.commit(s, len(new), out.hidden, out.stop_logits)
            fed[s.id] += list(new)
        elif op < 0.8 and s.length < MAX - 1:  # a guess, rolled back while in flight one time in three
            with store.lock:
                assert store.reserve_speculative(s)
                s.speculating, epoch = True, s.epoch
            new = rng.standard_normal((1, D)).astype(np.float32)
            s.kv.length = s.length
            out = engine.forward([s.kv], [new])[0]
            if rng.random() < 1 / 3:
                store.truncate(s, int(rng.integers(0, s.confirmed + 1)))
                del fed[s.id][s.length:]
            if store.commit_speculative(s, epoch, out.hidden, out.stop_logits):
                fed[s.id] += list(new)
        elif s.length > s.confirmed:
            store.accept(s, s.confirmed)
        for x in sessions:  # no step in flight: each slot holds the pages of its sentences, no more
            assert x.kv.length == x.length == len(fed[x.id])
            assert x.kv.capacity == x.kv.pages(x.length)
        held = sum(x.kv.nbytes for x in sessions)
        assert store.sentences_in_use * per <= held < (store.sentences_in_use + 3 * KVSlot.PAGE) * per
    for s in sessions:  # and they hold what a session fed the same sentences at once would
        seq = np.stack(fed[s.id] + [np.ones(D, np.float32)])
        alone = engine.new_slot()
        if s.length:
            engine.forward([alone], [seq[:-1]])
            alone.length = s.length
        np.testing.assert_allclose(s.kv.valid().numpy(), alone.valid().numpy(), atol=1e-5, rtol=0)
        out, ref = engine.forward([s.kv], [seq[-1:]])[0], engine.forward([alone], [seq[-1:]])[0]
        np.testing.assert_allclose(out.hidden, ref.hidden, atol=1e-5, rtol=0)
        # the full forward sums in another order: over up to 64 positions, 1e-4
        np.testing.assert_allclose(out.hidden, reference_outputs(model, seq)[0][-1], atol=1e-4, rtol=0)

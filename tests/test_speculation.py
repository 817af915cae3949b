"""Sentence-level speculation (issue 17) on a real server: the cloud guesses the next sentences with its
own SentenceVAE, the edge checks every guess. Greedy answers equal the non-speculative ones; a forced
mismatch is rolled back and recovered; rollback, detach and cancel leave the session accounting exact;
a server without a SentenceVAE grants nothing."""
import random
import shutil
import threading
import time

import numpy as np
import pytest
from cloud_helpers import MODEL_ID, D, running_server
from helpers import _make_sentence

from sllm import edge
from sllm.edge.api import AnswerOptions
from sllm.edge.speculate import TOLERANCE, Speculation, same_sentence
from sllm.modeling.svae_bundle import load_svae_folder
from sllm.protos.client import CloudClient, CloudError
from sllm.protos.v1 import sllm_pb2 as pb
from sllm.runtime.manifest import BundleError

PROMPTS = [" ".join(_make_sentence(random.Random(i * 7 + k)) for k in range(1 + i % 2)) for i in range(20)]
CAP = 5  # sentences per answer


@pytest.fixture(scope="module")
def export(sllm_export):
    return sllm_export


@pytest.fixture(scope="module")
def server(export):
    with running_server(export / "cloud", speculate_max=16, batch_wait_ms=0.0) as srv:
        yield srv


def _wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.005)
    return cond()


def _answers(server, export, speculate: int, prompts, perturb=None, **options):
    """Each pair of prompts is one conversation of two turns; the texts, and the edge's speculation stats.
    `options`: the answers' (edge.api.AnswerOptions: the repetition controls are on by default)."""
    out = []
    with edge.connect(f"127.0.0.1:{server.port}", export / "edge", speculate=speculate,
                      options=AnswerOptions(**options)) as chat:
        speculation = chat.session.stepper.speculation
        speculation.perturb = perturb
        for i in range(0, len(prompts), 2):
            if i:
                chat.reset()
            for p in prompts[i:i + 2]:
                out.append(chat.ask(p, max_sentences=CAP).text())
        granted = chat.session.stepper.conv.speculate
    return out, speculation.stats, granted


def _store_is_exact(store) -> bool:
    """The KV budget's count equals what the sessions hold and reserve; no session runs past its N."""
    with store.lock:
        held = list(store.sessions.values())
        return (store.sentences_in_use == sum(s.length + s.reserved for s in held)
                and all(s.length - s.confirmed <= max(s.speculate, 0) or not s.attached for s in held))


@pytest.mark.parametrize("controls", [{}, {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                                           "no_repeat_sentence": False}], ids=["default-controls", "plain-greedy"])
def test_greedy_answers_equal_the_non_speculative_ones(server, export, controls):
    reference, _, granted = _answers(server, export, 0, PROMPTS, **controls)
    assert granted == 0 and sum(bool(a) for a in reference) >= 10  # the tiny model does answer
    for n in (1, 4, 16):
        answers, stats, granted = _answers(server, export, n, PROMPTS, **controls)
        assert granted == n
        assert answers == reference, f"speculate={n}"
        # the cloud guesses with the edge's repetition controls over the same earlier sentences
        assert stats.accepted > 0 and stats.acceptance > 0.9, (n, stats)
    assert _store_is_exact(server.store)
    assert server.service.stats()["speculation_accepted_total"] > 0


def test_a_sampled_turn_is_not_guessed_and_answers_as_without(server, export):
    sampled = {"temperature": 0.9, "seed": 3}
    reference, _, _ = _answers(server, export, 0, PROMPTS[:6], **sampled)
    before = server.service.stats()["speculative_steps_total"]
    answers, stats, _ = _answers(server, export, 4, PROMPTS[:6], **sampled)
    assert answers == reference
    assert stats.accepted == stats.corrected == 0 and stats.declined > 0  # no greedy guess to overrule
    assert server.service.stats()["speculative_steps_total"] == before


def test_a_forced_mismatch_is_rolled_back_and_recovered(server, export):
    hits = []

    def perturb(position, vectors):  # the edge's vector of an early generated sentence of each conversation
        if position in (1, 2):  # (the first answer's first sentence: prompts hold 1 or 2 sentences)
            hits.append(position)
            return vectors + 0.5
        return vectors

    prompts = PROMPTS[:6]
    reference, _, _ = _answers(server, export, 0, prompts, perturb)
    n_ref = len(hits)
    assert n_ref > 0  # the hook fired
    dropped = server.service.stats()["speculation_dropped_total"]
    answers, stats, _ = _answers(server, export, 4, prompts, perturb)
    assert len(hits) == 2 * n_ref
    assert answers == reference
    # each perturbed vector was caught: corrected, or, once the answer holds a sentence of the edge's own
    # (whose tokens the cloud never saw, so its repetition controls cannot guess after it), declined
    assert 0 < stats.corrected <= n_ref <= stats.corrected + stats.declined
    assert server.service.stats()["speculation_dropped_total"] > dropped
    assert _store_is_exact(server.store)


def test_the_cloud_guesses_exactly_the_sentences_the_edge_decodes(server, export):
    """The edge sends its stop rule with the turn (cap, threshold, no stop before the answer's second
    sentence): the cloud declines no sentence the edge then decodes (each decline costs a round trip)
    and guesses none past the answer's end (wasted work, dropped at the next turn)."""
    for threshold in (1.0, 0.0, 0.3):  # never stop / after the first sentence / in between
        reference, _, _ = _answers(server, export, 0, PROMPTS, stop_threshold=threshold)
        dropped = server.service.stats()["speculation_dropped_total"]
        answers, stats, _ = _answers(server, export, 4, PROMPTS, stop_threshold=threshold)
        assert answers == reference, threshold
        assert stats.accepted > 0 and stats.declined == stats.corrected == 0, (threshold, stats)
        assert _wait_for(lambda: not any(s.speculating for s in server.store.sessions.values()))
        assert server.service.stats()["speculation_dropped_total"] == dropped, threshold


@pytest.mark.parametrize("field,value", [("stop_threshold", float("nan")), ("stop_threshold", 1.5),
                                         ("repetition_penalty", float("nan")), ("repetition_penalty", -2.0)])
def test_a_bad_decoding_is_refused_and_changes_nothing(server, export, field, value):
    rt, prompt = _encode(export, [PROMPTS[1]])
    with CloudClient(f"127.0.0.1:{server.port}") as c:
        conv = c.conversation(rt.model_id, rt.d_model, speculate=2, step_timeout=60)
        with pytest.raises(CloudError, match="append.decoding"):
            conv.append(prompt, position=0, decoding=pb.Decoding(guess=True, **{field: value}))
    assert _wait_for(lambda: _store_is_exact(server.store) and not any(s.reserved for s in server.store.sessions.values()))


def _encode(export, texts):
    from sllm.edge.runtime import EdgeRuntime

    rt = EdgeRuntime.load(export / "edge", device="cpu")
    return rt, rt.encode([ids for t in texts for ids in rt.prompt_sentences(t)])


def test_rollback_and_detach_free_the_speculative_sentences(server, export):
    rt, prompt = _encode(export, [PROMPTS[1]])
    p = len(prompt)
    with CloudClient(f"127.0.0.1:{server.port}") as c:
        per = c.model_info().kv_bytes_per_sentence
        conv = c.conversation(rt.model_id, rt.d_model, speculate=3, step_timeout=60)
        step = conv.append(prompt, position=0)
        session = next(s for s in server.store.sessions.values() if s.id == conv.session_id)
        if step.stop:
            pytest.skip("the tiny model stops at once on this prompt")
        # the cloud runs 3 sentences ahead (or declines where its guess ends the answer)
        guesses = []
        for k in (1, 2, 3):
            guesses.append(conv.speculative_step(p + k))
            if guesses[-1].declined or guesses[-1].stop:
                break
        n_spec = sum(not g.declined for g in guesses)
        assert n_spec >= 1
        assert _wait_for(lambda: session.length - session.confirmed == n_spec)
        assert c.stats().kv_bytes == per * session.length
        # a correction at p (the first guess overruled): everything from p on is dropped, then one step
        step = conv.append(prompt[:1] + 0.25, position=p)
        assert step.past_length == p + 1 and step.epoch == 2 and conv.confirmed == p + 1
        # keep the session detached: its speculative sentences go, the confirmed ones stay
        assert conv.close(keep=True)
        assert _wait_for(lambda: not session.speculating)
        assert session.length == session.confirmed == p + 1 and not session.spec
        assert c.stats().kv_bytes == per * (p + 1)
        assert _store_is_exact(server.store)
        resumed = c.conversation(rt.model_id, rt.d_model, session_id=conv.session_id)
        assert resumed.resumed and resumed.past_length == p + 1
        np.testing.assert_array_equal(resumed.last.hidden, step.hidden)
        resumed.close()


def test_cancel_mid_speculation_leaves_nothing_behind(server, export):
    rt, prompt = _encode(export, [PROMPTS[3]])
    with CloudClient(f"127.0.0.1:{server.port}") as c:
        before = c.stats().sessions
        conv = c.conversation(rt.model_id, rt.d_model, speculate=16, step_timeout=60)
        conv.append(prompt, position=0)
        conv.speculative_step(len(prompt) + 1)  # the cloud is running ahead now
        conv.cancel()
        assert _wait_for(lambda: c.stats().sessions == before)
        assert _wait_for(lambda: not any(s.reserved for s in server.store.sessions.values()))
        assert _store_is_exact(server.store)
        assert c.stats().kv_bytes == sum(s.kv_bytes for s in server.store.sessions.values())


def test_an_interrupted_turn_and_a_new_turn_discard_the_guesses(server, export):
    def conversation(speculate):
        with edge.connect(f"127.0.0.1:{server.port}", export / "edge", speculate=speculate) as chat:
            answer = chat.ask(PROMPTS[0], max_sentences=CAP)
            first = next(iter(answer), None)
            answer.stop()  # after this sentence: the cloud may have guessed several more
            rest = answer.text()
            held = chat.context_sentences
            return first and first.text, rest, held, chat.ask(PROMPTS[1], max_sentences=CAP).text()

    assert conversation(16) == conversation(0)
    assert _store_is_exact(server.store)


def test_concurrent_speculating_conversations_equal_one_by_one(server, export):
    reference = _answers(server, export, 0, PROMPTS[:4])[0]
    results = {}

    def run(k):
        results[k] = _answers(server, export, 4, PROMPTS[:4])[0]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(results[k] == reference for k in range(3))


def test_a_server_without_a_sentence_vae_grants_nothing(cloud_bundle):
    with running_server(cloud_bundle) as srv, CloudClient(f"127.0.0.1:{srv.port}") as c:
        conv = c.conversation(MODEL_ID, D, speculate=4)
        assert conv.speculate == 0 and "SentenceVAE" in conv.speculate_note
        v = np.random.default_rng(0).standard_normal((3, D)).astype(np.float32)
        speculation = Speculation()
        assert speculation.append(conv, v).past_length == 3  # a prompt
        assert speculation.append(conv, v[:1]).past_length == 4  # a sentence: no guess to check, a plain Append
        conv.close()
        assert c.stats().speculate_max == 0


def test_the_svae_folder_belongs_to_one_model_and_is_checked(export, tmp_path):
    assert load_svae_folder(export / "svae").cfg.d_model > 0
    with pytest.raises(BundleError, match="belongs to model"):
        load_svae_folder(export / "svae", model_id="sllm-someone-else")
    broken = tmp_path / "svae"
    shutil.copytree(export / "svae", broken)
    with (broken / "ema.safetensors").open("r+b") as f:  # one flipped byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BundleError, match="sha256 differs from the manifest"):
        load_svae_folder(broken)


def test_tolerance_rule():
    v = np.linspace(-3, 3, 32, dtype=np.float32)
    assert same_sentence(v, v.astype(np.float16).astype(np.float32))  # float16 rounding on the wire
    assert same_sentence(v, v + 1e-6)  # ORT vs torch
    w = v.copy()
    w[5] += 10 * TOLERANCE
    assert not same_sentence(v, w)


@pytest.mark.parametrize("target, here", [
    ("127.0.0.1:50051", True), ("127.8.9.1:1", True), ("[::1]:50051", True), ("localhost:50051", True),
    ("LocalHost:1", True), ("dns:///localhost:50051", True), ("ipv4:127.0.0.1:5,10.0.0.2:5", True),
    ("unix:/tmp/sllm.sock", True),
    ("10.0.0.7:50051", False), ("[2001:db8::1]:443", False), ("gpu-box:50051", False),
    ("dns:///cloud.example.com:443", False), ("localhost.example.com:1", False)])
def test_speculation_is_asked_of_a_server_on_another_machine_only(target, here):
    assert edge.api.on_this_machine(target) is here
    assert edge.api.default_speculate(target) == (0 if here else edge.api.REMOTE_SPECULATE)


def test_by_default_a_loopback_server_is_not_asked_to_speculate(server, export):
    """The server would grant 16: the edge asks nothing of a server on this machine unless told to."""
    for asked, granted in ((None, 0), (4, 4)):
        with edge.connect(f"127.0.0.1:{server.port}", export / "edge", speculate=asked) as chat:
            assert chat.session.stepper.conv.speculate == granted

"""Sentence-level speculation (issue 17) on a real server: the cloud guesses the next sentences with the
edge bundle's own ONNX graphs, the edge checks every guess. A guess is the edge's decode of the same h_t,
token for token (batched rows, each with its own repetition controls); greedy answers equal the
non-speculative ones and no guess is overruled; a forced mismatch is rolled back and recovered; rollback,
detach and cancel leave the session accounting exact; a server without the graphs grants nothing, one
given another model's refuses to start."""
import random
import shutil
import threading
import time

import numpy as np
import pytest
from cloud_helpers import MODEL_ID, D, running_server
from helpers import _make_sentence

from sllm import edge
from sllm.cloud.guesses import GuessCodec
from sllm.edge.api import AnswerOptions
from sllm.edge.speculate import TOLERANCE, Speculation, same_sentence
from sllm.modeling.svae_bundle import load_svae_folder
from sllm.protos.client import CloudClient, CloudError
from sllm.protos.v1 import sllm_pb2 as pb
from sllm.runtime.manifest import BundleError, cloud_weights_sha256, read_manifest
from sllm.sentences.sampling import SamplingConfig, StopCalibration

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


def _answers(server, export, speculate: int, prompts, perturb=None, wire_dtype="float32", **options):
    """Each pair of prompts is one conversation of two turns; the texts, and the edge's speculation stats.
    `options`: the answers' (edge.api.AnswerOptions: the repetition controls are on by default)."""
    out = []
    with edge.connect(f"127.0.0.1:{server.port}", export / "edge", speculate=speculate, wire_dtype=wire_dtype,
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
        # the cloud guesses with the edge's graphs and repetition controls over the same earlier sentences:
        # the edge overrules none of its guesses
        assert stats.accepted > 0 and stats.corrected == 0, (n, stats)
    assert _store_is_exact(server.store)
    assert server.service.stats()["speculation_accepted_total"] > 0


def test_with_float16_on_the_wire_no_guess_is_overruled(server, export):
    """The edge decodes h_t rounded to float16 and sends float16 vectors; the cloud guesses from h_t rounded
    alike and rounds its guess's vector alike, so the edge still accepts every guess."""
    reference, _, _ = _answers(server, export, 0, PROMPTS, wire_dtype="float16")
    answers, stats, _ = _answers(server, export, 4, PROMPTS, wire_dtype="float16")
    assert answers == reference
    assert stats.accepted > 0 and stats.corrected == 0, stats


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
    rules = [{"stop_threshold": t} for t in (1.0, 0.0, 0.3)]  # never stop / after the first sentence / in between
    # a stop calibration (sent with the turn; the cloud applies the same rule at the same answer position):
    # the answers end after their third sentence (those that get there); one whose decision varies along the answer
    rules += [{"stop_calibration": StopCalibration(1.0, (-30.0, -30.0, 30.0), 0.5)},
              {"stop_calibration": StopCalibration(0.8, (-0.6, 0.4, -0.2, 0.7), 0.45)}]
    ends = []
    for rule in rules:
        reference, _, _ = _answers(server, export, 0, PROMPTS, **rule)
        ends.append(reference)
        dropped = server.service.stats()["speculation_dropped_total"]
        answers, stats, _ = _answers(server, export, 4, PROMPTS, **rule)
        assert answers == reference, rule
        assert stats.accepted > 0 and stats.declined == stats.corrected == 0, (rule, stats)
        assert _wait_for(lambda: not any(s.speculating for s in server.store.sessions.values()))
        assert server.service.stats()["speculation_dropped_total"] == dropped, rule
    assert ends[3] != ends[0]  # the calibration moved where answers end (never stopping: at the cap)


@pytest.mark.parametrize("field,value", [("stop_threshold", float("nan")), ("stop_threshold", 1.5),
                                         ("stop_offsets", [0.5]),  # a calibration without its scale and threshold
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


def test_a_server_given_another_models_edge_bundle_refuses_to_start(cloud_bundle, export, tmp_path):
    with pytest.raises(BundleError, match="not halves of the same model.*refusing to speculate"):
        with running_server(cloud_bundle, speculate_max=4, edge_dir=str(export / "edge")):
            pass
    for folder in (export / "cloud", tmp_path / "nowhere"):  # no edge bundle there
        with pytest.raises(BundleError, match="not 'edge'|no such bundle directory"):
            with running_server(cloud_bundle, speculate_max=4, edge_dir=str(folder)):
                pass
    with running_server(cloud_bundle, speculate_max=0, edge_dir=str(export / "edge")) as srv:  # not read when off
        assert srv.batcher.codec is None


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


# ---------------------------------------------------------------- the guesses are the edge's decodes

@pytest.fixture(scope="module")
def h_t(export):
    """200 h_t of the tiny model (its cloud blocks over the sentences of made-up passages of 20), and the
    edge runtime of the same export."""
    import torch

    from sllm.edge.runtime import EdgeRuntime
    from sllm.modeling.cloud_bundle import load_cloud_bundle

    rt = EdgeRuntime.load(export / "edge", device="cpu")
    model, _ = load_cloud_bundle(export / "cloud")
    rng = random.Random(5)
    sentences = [ids for _ in range(400) for ids in rt.prompt_sentences(" ".join(_make_sentence(rng)))][:200]
    vectors = rt.encode(sentences)
    with torch.no_grad():
        hidden = [model(torch.from_numpy(vectors[i:i + 20])[None])[0][0] for i in range(0, 200, 20)]
    return rt, torch.cat(hidden).numpy()  # [200, d]


ROW_OPTIONS = [None,  # plain greedy (a server's caller without a Decoding)
               AnswerOptions(),  # edge-chat's repetition controls
               AnswerOptions(repetition_penalty=1.0, no_repeat_ngram_size=0, no_repeat_sentence=False),
               AnswerOptions(repetition_penalty=2.0, no_repeat_ngram_size=2, no_repeat_sentence=False, max_tokens=5),
               AnswerOptions(repetition_penalty=1.0, no_repeat_ngram_size=0, no_repeat_sentence=True),
               AnswerOptions(max_tokens=3)]


def _edge_decodes(rt, hidden, options):
    """Each h_t decoded as the edge's sentence loop decodes it (EdgeRuntime.decode: sentence.onnx), every row
    continuing an answer of the rows before it (up to 3, their plain greedy sentences); (decodes, histories)."""
    plain = [rt.decode(h, SamplingConfig()).ids for h in hidden]
    histories = [[t for t in plain[max(0, i - 1 - i % 4):i] if t] for i in range(len(hidden))]
    out = []
    for h, o, history in zip(hidden, options, histories):
        if o is None:
            out.append(rt.decode(h, SamplingConfig()).ids)
        else:
            out.append(rt.decode(h, o, o.max_tokens or None, answer=history if o.controls_repetition else ()).ids)
    return out, histories, plain


@pytest.mark.parametrize("mix", ["plain", "controls", "mixed"])
def test_the_guesses_are_the_edges_decodes_token_for_token(export, h_t, mix):
    """GuessCodec (the server's guesses, all pending sessions in one batch, each row with its own controls,
    answer so far and token limit) gives exactly EdgeRuntime.decode's tokens for every h_t, at any batch size."""
    rt, hidden = h_t
    cloud = read_manifest(export / "cloud", kind="cloud")
    codec = GuessCodec.load(export / "edge", cloud["model_id"], rt.d_model, cloud_weights_sha256(cloud))
    options = {"plain": [None] * 200, "controls": [AnswerOptions()] * 200,
               "mixed": [ROW_OPTIONS[i % len(ROW_OPTIONS)] for i in range(200)]}[mix]
    edge, histories, plain = _edge_decodes(rt, hidden, options)
    assert sum(map(bool, edge)) > 150  # the tiny model says something
    if mix != "plain":  # the controls and limits change sentences: the comparison says something
        assert sum(a != b for a, b in zip(edge, plain)) > 20
    for batch in (1, 7, 64, 200):
        guesses = []
        for i in range(0, 200, batch):
            guesses += codec.decode(hidden[i:i + batch], options[i:i + batch], histories[i:i + batch])
        assert guesses == edge, batch
    # the re-encoded guesses, batched: the vectors the edge's own encodes give (within what the edge accepts)
    said = [t for t in edge if t][:64]
    batched, alone = codec.encode(said), np.concatenate([rt.encode([t]) for t in said])
    assert all(same_sentence(a, b) for a, b in zip(alone, batched))
    assert float(np.abs(batched - alone).max()) < 1e-5


def test_the_guess_codec_checks_its_input(export, h_t):
    rt, hidden = h_t
    cloud = read_manifest(export / "cloud", kind="cloud")
    codec = GuessCodec.load(export / "edge", cloud["model_id"], rt.d_model, cloud_weights_sha256(cloud))
    with pytest.raises(ValueError, match="h_t must be"):
        codec.decode(hidden[:2, :5])
    assert codec.decode(hidden[:0]) == []
    with pytest.raises(BundleError, match="refusing to speculate"):
        GuessCodec.load(export / "edge", cloud["model_id"], rt.d_model, "0" * 64)


def test_the_guess_bench_runs_and_finds_every_guess_equal_to_the_edges(export, h_t):
    """bench/speculation.py on the tiny model (its figures are printed by the bench, not checked here)."""
    from bench.speculation import guess_timing, tolerance_facts, tolerance_line

    rt, hidden = h_t
    cloud = read_manifest(export / "cloud", kind="cloud")
    codec = GuessCodec.load(export / "edge", cloud["model_id"], rt.d_model, cloud_weights_sha256(cloud))
    sentences = [t for t in codec.decode(hidden[:24]) if t][:16]

    def edge_decode(h, controls, history):
        return rt.decode(h, controls or SamplingConfig(), controls and (controls.max_tokens or None),
                         answer=history if controls else ()).ids

    rows = guess_timing(codec, rt.encode(sentences), sentences, [1, 4], 1, edge_decode)
    assert [(r["controls"], r["batch"]) for r in rows] == [(False, 1), (False, 4), (True, 1), (True, 4)]
    assert all(r["same_as_edge"] == r["guesses"] == 16 and r["decode_ms_per_token"] > 0 for r in rows)
    facts = tolerance_facts(rt, sentences)
    assert facts["greedy_tokens_identical"] == facts["sentences"] == 16
    assert facts["encoder_max_abs_alone_vs_batched"] < 1e-5 and "16/16" in tolerance_line(facts)

"""Speculation's fair shares: the model thread serves the edges' steps between the tokens of a guessing
pass, and a caller that has had less guessing time than the batch in progress by more than a quantum
gets its guess in before that batch ends (cloud.guess_shares, cloud.batcher). The batcher is driven by
hand, in this thread (its own thread never starts), on the real engine and the edge bundle's graphs,
so the order of its forward passes is exact."""
import numpy as np
import pytest

from sllm.cloud.batcher import Job, SpecJob
from sllm.cloud.config import ServerConfig
from sllm.cloud.guess_shares import GuessShares
from sllm.cloud.server import CloudServer
from sllm.cloud.service import parse_decoding
from sllm.protos.v1 import sllm_pb2 as pb


def test_an_idle_caller_starts_level_and_banks_no_credit():
    shares = GuessShares(quantum_s=0.002)
    shares.begin({"a"})
    shares.charge({"a": 10}, 1.0)  # a has guessed for a second
    assert shares.leaders({"a", "b"}) == {"b"}  # b, new, goes first
    shares.begin({"b"})
    shares.charge({"b": 5}, 0.5)
    shares.begin({"a"})  # a's batch starts at a's clock: the floor moves there
    assert shares.rank("c") == pytest.approx(1.0)  # a newcomer starts there, not at 0
    shares.charge({"a": 1}, 0.1)
    assert shares.rank("b") == pytest.approx(1.0)  # b, idle since, is no better off than a newcomer
    assert "b" not in shares.clock  # and forgotten: memory stays bounded by the busy callers


def test_callers_within_a_quantum_share_a_batch_and_a_pass_is_split_by_tokens():
    shares = GuessShares(quantum_s=0.002)
    shares.begin({"a", "b", "c"})
    shares.charge({"a": 3, "b": 1}, 0.004)  # a decoded 3 of the 4 tokens
    assert shares.rank("a") == pytest.approx(0.003) and shares.rank("b") == pytest.approx(0.001)
    assert shares.leaders({"a", "b", "c"}) == {"b", "c"}  # a is more than a quantum ahead of c
    assert shares.behind("c", start=0.0, elapsed_s=0.0025) and not shares.behind("c", 0.0, 0.0015)


@pytest.fixture(scope="module")
def server(sllm_export):
    """A server built but never started: its batcher is driven from the test."""
    return CloudServer.from_bundle(sllm_export / "cloud", ServerConfig(port=0, speculate_max=16))


def _session(srv, owner: str, prompt: np.ndarray, speculate: int, sink):
    """A session of `owner` holding `prompt`, stepped and committed as the service does, ready to guess."""
    store, batcher = srv.store, srv.batcher
    s = store.acquire(owner, None, None, None)[0]
    with store.lock:
        store.reserve(s, len(prompt))
        s.guess, s.decoding = parse_decoding(pb.Decoding(guess=True, stop_threshold=1.0))  # never stops
        s.answer_start = len(prompt)
    job = Job(s, prompt, start=0)
    batcher._run([job])
    assert job.error is None
    assert store.commit(s, len(prompt), job.output.hidden, job.output.stop_logits)
    with store.lock:
        s.speculate, s.on_speculative = speculate, sink
    return s


@pytest.mark.parametrize("quantum_s, light_guess_first", [(0.0, True), (1e9, False)],
                         ids=["behind-by-a-quantum", "within-its-quantum"])
def test_steps_and_a_light_callers_guess_run_between_the_tokens_of_a_heavy_batch(server, quantum_s,
                                                                                light_guess_first):
    srv, batcher = server, server.batcher
    batcher.shares = GuessShares(quantum_s)
    rng = np.random.default_rng(0)
    d = srv.engine.d
    landed = []  # (owner, past_length) of each speculative step sent to a stream, in order

    def sink(owner):
        return lambda epoch, past_length, out, assumed: landed.append((owner, past_length, out is not None))

    heavy = [_session(srv, "heavy", rng.standard_normal((3, d)).astype(np.float32), 8, sink("heavy"))
             for _ in range(2)]
    light_stepper = _session(srv, "light", rng.standard_normal((2, d)).astype(np.float32), 0, sink("light"))
    light_guesser = _session(srv, "light", rng.standard_normal((2, d)).astype(np.float32), 8, sink("light"))
    for s in heavy:
        batcher.speculate(s)
    batcher._serve(batcher._take(wait=False))  # the two heavy guesses wait for a pass
    assert [j.session.owner for j in batcher.guesses] == ["heavy", "heavy"]

    passes = []  # (kind, owner) of the jobs of every forward pass, in order
    run, decode = batcher._run, batcher.codec.decode
    light_step = Job(light_stepper, rng.standard_normal((1, d)).astype(np.float32), start=light_stepper.length)
    tokens_between = []

    def recording_run(jobs):
        passes.append(sorted({(type(j).__name__, j.session.owner) for j in jobs}))
        run(jobs)

    def decode_with_arrivals(hidden, controls=None, histories=None, between=None):
        def arrivals():  # after the heavy batch's first token: a light step and a light guess come in
            tokens_between.append(len(tokens_between))
            if len(tokens_between) == 1:
                with srv.store.lock:
                    srv.store.reserve(light_stepper, 1)
                batcher.submit(light_step)
                batcher.speculate(light_guesser)
            between()
        return decode(hidden, controls, histories, arrivals if between is not None else None)

    batcher._run, batcher.codec.decode = recording_run, decode_with_arrivals
    try:
        batcher._guess_pass(yields=True)
        while batcher.guesses:  # what is left (the light guess, when it did not get in)
            batcher._guess_pass(yields=True)
    finally:
        del batcher._run, batcher.codec.decode
        batcher.queue.clear()  # the next guesses the passes queued: nobody serves them
        batcher.guesses = []

    assert tokens_between, "the heavy batch decoded no token past its first: nothing could run between"
    assert light_step.done.is_set() and light_step.error is None
    heavy_pass = passes.index([("SpecJob", "heavy")])
    # the step ran between the heavy batch's tokens, before that batch's forward pass
    assert passes.index([("Job", "light")]) < heavy_pass
    assert (passes.index([("SpecJob", "light")]) < heavy_pass) == light_guess_first
    owners = [owner for owner, _, ok in landed if ok]
    assert owners.count("heavy") == 2 and "light" in owners  # (a light caller still behind may get in again)
    assert (owners[0] == "light") == light_guess_first
    guessing = {o: u["guess_seconds_total"] for o, u in srv.store.owner_stats(lambda owner: owner).items()}
    assert guessing["heavy"] > 0 and guessing["light"] > 0  # each caller's guessing time, for /metrics
    for s in heavy + [light_stepper, light_guesser]:
        srv.store.free(s, "test")


def test_guesses_never_starve_while_steps_keep_coming(server):
    """A speculating edge waits for its guess, so a round of the model thread runs a guessing pass even when
    new steps have come in meanwhile (they are served between its tokens)."""
    srv, batcher = server, server.batcher
    batcher.shares = GuessShares()
    rng = np.random.default_rng(1)
    d = srv.engine.d
    landed = []

    def guess_landed(epoch, past_length, out, assumed):
        landed.append(out is not None)
        batcher.stopping = True  # the loop ends at its next take

    guesser = _session(srv, "a", rng.standard_normal((2, d)).astype(np.float32), 8, guess_landed)
    stepper = _session(srv, "b", rng.standard_normal((2, d)).astype(np.float32), 0, None)
    batcher.speculate(guesser)
    arrivals, serve = [], batcher._serve

    def serve_while_steps_arrive(jobs):
        serve(jobs)
        if len(arrivals) < 20 and not batcher.stopping:  # another step comes in during every round
            with srv.store.lock:
                srv.store.reserve(stepper, 1)
            arrivals.append(Job(stepper, rng.standard_normal((1, d)).astype(np.float32), start=stepper.length))
            batcher.submit(arrivals[-1])

    batcher._serve = serve_while_steps_arrive
    try:
        batcher._loop()  # returns once the guess has landed (stopping)
    finally:
        del batcher._serve
        batcher.stopping = False
        batcher.queue.clear()
        batcher.guesses = []
        for s in (guesser, stepper):
            srv.store.free(s, "test")
    assert landed == [True]
    assert len(arrivals) == 1  # the guess ran in the first round, not after the steps stopped coming


def test_a_failure_between_the_tokens_is_the_model_threads_not_the_guesss(server):
    """What fails while a guessing pass serves steps is not swallowed as a failed guess (which would only
    decline it): it reaches the model thread's loop, which dies loudly and fails every waiting job."""
    srv, batcher = server, server.batcher
    batcher.shares = GuessShares()
    rng = np.random.default_rng(2)
    d = srv.engine.d
    heavy = [_session(srv, "heavy", rng.standard_normal((3, d)).astype(np.float32), 8, lambda *a: None)
             for _ in range(2)]
    for s in heavy:
        batcher.speculate(s)
    batcher._serve(batcher._take(wait=False))
    decode = batcher.codec.decode

    def decode_with_a_step(hidden, controls=None, histories=None, between=None):
        def arrival():
            batcher.queue.append(Job(heavy[0], rng.standard_normal((1, d)).astype(np.float32)))
            between()
        return decode(hidden, controls, histories, arrival if between is not None else None)

    def broken_serve(jobs):
        raise RuntimeError("a bug in serving steps")

    batcher.codec.decode, batcher._serve = decode_with_a_step, broken_serve
    try:
        with pytest.raises(RuntimeError, match="a bug in serving steps"):
            batcher._guess_pass(yields=True)
    finally:
        del batcher.codec.decode, batcher._serve
        batcher.queue.clear()
        batcher.guesses = []
        for s in heavy:
            srv.store.free(s, "test")

"""Speculation that costs the cloud no more than it saves, against a real server with a SentenceVAE: a
client that lets the cloud guess and then rewinds, and one that accepts every guess with no cap and a
stop threshold of 1, get a bounded number of guesses, whatever they send. The bound is asserted on the
work the server counts (guesses decoded, tokens decoded for them), which does not depend on how busy
the machine is; CPU seconds are printed, and the honest client's step latency beside four rewinders is
a figure, not a test: `python -m bench.speculation_fairness`."""
import random
import time

import pytest
from cloud_helpers import running_server
from helpers import _make_sentence

from sllm import edge
from sllm.edge.api import AnswerOptions
from sllm.protos.client import CloudClient
from sllm.protos.v1 import sllm_pb2 as pb

PROMPTS = [" ".join(_make_sentence(random.Random(i * 11 + k)) for k in range(2)) for i in range(12)]
N = 8  # sentences the cloud may run ahead


@pytest.fixture(scope="module")
def export(sllm_export):
    return sllm_export


@pytest.fixture(scope="module")
def server(export):
    with running_server(export / "cloud", speculate_max=16, speculate_answer_max=16) as srv:
        yield srv


def _cpu(srv) -> float:
    """CPU seconds of the model thread (where guesses are decoded and every step runs)."""
    return time.clock_gettime(time.pthread_getcpuclockid(srv.batcher.thread.ident))


def _prompt(export, text):
    from sllm.edge.runtime import EdgeRuntime

    rt = EdgeRuntime.load(export / "edge", device="cpu")
    return rt, rt.encode(list(rt.prompt_sentences(text)))


def _honest(srv, export, prompts) -> tuple[float, int]:
    """An honest speculating edge: (model-thread CPU, sentences in its answers)."""
    sentences = 0
    cpu0 = _cpu(srv)
    with edge.connect(f"127.0.0.1:{srv.port}", export / "edge", speculate=N, options=AnswerOptions()) as chat:
        for p in prompts:
            for _ in chat.ask(p, max_sentences=6):
                sentences += 1
            chat.reset()
    return _cpu(srv) - cpu0, max(1, sentences)


def _rewinder(srv, rt, prompt, rounds: int) -> tuple[float, int]:
    """Lets the cloud guess N sentences, then rewinds to the prompt's end with a sentence of its own, again
    and again: (model-thread CPU, messages sent)."""
    p = len(prompt)
    decoding = pb.Decoding(guess=True, stop_threshold=1.0)
    cpu0, sent = _cpu(srv), 0
    with CloudClient(f"127.0.0.1:{srv.port}") as c:
        conv = c.conversation(rt.model_id, rt.d_model, speculate=N, step_timeout=60)
        base = conv.append(prompt, position=0, decoding=decoding).past_length
        sent += 1
        for r in range(rounds):
            for k in range(1, N + 1):
                if conv.speculative_step(base + k).declined:
                    break
            base = conv.append(prompt[-1:] * (1 + 0.01 * r), position=p, decoding=decoding).past_length
            sent += 1
        conv.close()
    return _cpu(srv) - cpu0, sent


def _accept_all(srv, rt, prompt) -> tuple[float, int]:
    """Accepts every guess, no cap, stop threshold 1: (model-thread CPU, sentences accepted)."""
    p = len(prompt)
    cpu0, accepted = _cpu(srv), 0
    with CloudClient(f"127.0.0.1:{srv.port}") as c:
        conv = c.conversation(rt.model_id, rt.d_model, speculate=16, step_timeout=60)
        conv.append(prompt, position=0, decoding=pb.Decoding(guess=True, stop_threshold=1.0))
        while True:
            step = conv.speculative_step(p + accepted + 1)
            if step.declined:
                break
            conv.accept(p + accepted)
            accepted += 1
        conv.close()
    return _cpu(srv) - cpu0, max(1, accepted)


def _guess_work(srv) -> tuple[int, int]:
    """(guesses that landed, tokens decoded for all guesses, landed or dropped in flight) so far: the
    server's own counters."""
    st = srv.service.stats()
    return st["speculative_steps_total"], st["speculation_decode_tokens_total"]


def test_rewinding_and_accept_everything_speculators_get_a_bounded_number_of_guesses(server, export):
    honest_cpu, honest_n = _honest(server, export, PROMPTS[:6])
    rt, prompt = _prompt(export, PROMPTS[0])
    max_tokens = rt.spec.max_sentence_tokens  # the most tokens one guess may decode
    rounds = 30

    guesses0, tokens0 = _guess_work(server)
    stopped0 = server.service.stats()["speculation_stopped_total"]
    rew_cpu, rew_n = _rewinder(server, rt, prompt, rounds=rounds)
    guesses1, tokens1 = _guess_work(server)
    acc_cpu, acc_n = _accept_all(server, rt, prompt)
    guesses2, tokens2 = _guess_work(server)
    print(f"model-thread CPU: honest {1000 * honest_cpu / honest_n:.2f} ms per sentence ({honest_n}); rewinder "
          f"{1000 * rew_cpu / rew_n:.2f} ms per message ({rew_n}, {guesses1 - guesses0} guesses, {tokens1 - tokens0} tokens); accept-all "
          f"{1000 * acc_cpu / acc_n:.2f} ms per accepted ({acc_n}, {guesses2 - guesses1} guesses, {tokens2 - tokens1} tokens)")

    # The rewinder wastes every guess: it loses guessing once it has wasted two windows more than it took
    # (a window in flight may still land), so its guesses do not grow with its messages (30 rounds x 8
    # guesses unbounded).
    assert server.service.stats()["speculation_stopped_total"] == stopped0 + 1
    assert 2 * N < guesses1 - guesses0 <= 4 * N
    assert tokens1 - tokens0 <= 5 * N * (max_tokens + 1)  # and those dropped in flight, one per rewind
    # Accept-all: no answer guessed past --speculate-answer-max (16), however far the edge lets it run.
    assert acc_n == 16 and guesses2 - guesses1 <= 16 + N
    assert tokens2 - tokens1 <= (guesses2 - guesses1 + 1) * (max_tokens + 1)


def test_the_banner_says_when_the_cloud_can_read_the_conversation():
    from types import SimpleNamespace

    from sllm.edge.cli import _speculation_words

    on = SimpleNamespace(speculate=16, conv=SimpleNamespace(speculate=16, speculate_note=""))
    off = SimpleNamespace(speculate=0, conv=SimpleNamespace(speculate=0, speculate_note=""))
    assert "the cloud can read this conversation" in _speculation_words(on)
    assert "--speculate 0" in _speculation_words(on)
    assert "can read" not in _speculation_words(off)

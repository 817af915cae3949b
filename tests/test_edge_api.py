"""`import edge` (docs/edge-api.md) against a real gRPC server on 127.0.0.1 and the real exported
bundles of the bundled model (models/default): the API says what `edge-chat` prints, seeds
reproduce, a conversation carries over turns, failures are one clear EdgeError and the
conversation goes on where it can; a server that stops answering ends a turn within the step
deadline, keepalive pings notice a vanished server, client certificates work (mutual TLS)."""
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
from cloud_helpers import running_server, self_signed_cert
from helpers import NO_TORCH_BLOCKER, ROOT
from typer.testing import CliRunner

from sllm import edge
from sllm.edge.cli import app
from sllm.modeling.cloud_bundle import write_random_cloud_bundle
from sllm.protos.client import DEFAULT_KEEPALIVE_S, channel_options

MODEL = ROOT / "models" / "default"
FIRST, SECOND = "It is a truth universally acknowledged,", "She laughed. Then she was gone."
SAMPLED = dict(temperature=0.9, top_k=50, top_p=0.95, seed=7)
SERVER_MIN_PING_INTERVAL_S = 10.0  # cloud/server.py: grpc.http2.min_ping_interval_without_data_ms


@pytest.fixture
def relay(server):
    r = SilentRelay(server.port)
    yield r
    r.close()


@pytest.fixture
def chat(server, runtime):
    with edge.connect(f"127.0.0.1:{server.port}", runtime) as c:
        yield c


def _edge_chat(server, *args, stdin: str | None = None) -> list[dict]:
    """`edge-chat --json` against `server`: its JSON lines."""
    r = CliRunner().invoke(app, ["--server", f"127.0.0.1:{server.port}", "--bundle", str(MODEL / "edge"),
                                 "--threads", "1", "--json", *map(str, args)], input=stdin)
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.stdout.splitlines()]


def _answers(lines: list[dict]) -> list[list[str]]:
    """Sentence texts of each turn."""
    turns = [[]]
    for ev in lines:
        if ev["event"] == "sentence":
            turns[-1].append(ev["text"])
        elif ev["event"] == "turn_end":
            turns.append([])
    return turns[:-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the same answers as edge-chat

def test_greedy_answer_equals_edge_chat(chat, server):
    answer = chat.ask(FIRST, max_sentences=4, stop_threshold=1.0)  # 1: never stop (the cap ends it)
    texts = [s.text for s in answer]
    assert len(texts) == 4 and answer.end.reason == "max_sentences"
    lines = _edge_chat(server, "--prompt", FIRST, "--max-sentences", 4, "--stop-threshold", 1)
    assert _answers(lines) == [texts]
    cli_end = lines[-1]
    assert (cli_end["reason"], cli_end["context_sentences"]) == (answer.end.reason, answer.end.context_sentences)
    plain = CliRunner().invoke(app, ["--server", f"127.0.0.1:{server.port}", "--bundle", str(MODEL / "edge"),
                                     "--threads", "1", "--prompt", FIRST, "--max-sentences", "4",
                                     "--stop-threshold", "1"])
    assert plain.exit_code == 0 and plain.stdout == "".join(texts) + "\n"


def test_second_turn_sees_the_first(chat, server):
    one = chat.ask(FIRST, max_sentences=3)
    first = [s.text for s in one]
    two = chat.ask(SECOND, max_sentences=3)
    second = [s.text for s in two]
    assert _answers(_edge_chat(server, "--max-sentences", 3, stdin=f"{FIRST}\n{SECOND}\n")) == [first, second]
    assert two.end.turn == 2
    assert two.end.context_sentences == one.end.context_sentences + two.end.prompt_sentences + len(second)
    assert chat.context_sentences == two.end.context_sentences
    chat.reset()  # a fresh conversation answers the second prompt otherwise: turn 2 saw turn 1
    assert chat.context_sentences == 0
    alone = chat.ask(SECOND, max_sentences=3, stop_threshold=1.0)
    assert [s.text for s in alone] != second and alone.end.context_sentences == alone.end.prompt_sentences + 3


def test_seeded_sampling_reproduces_and_equals_edge_chat(chat, server):
    first = chat.ask(FIRST, max_sentences=3, **SAMPLED).text()
    chat.reset()
    assert chat.ask(FIRST, max_sentences=3, **SAMPLED).text() == first
    chat.reset()
    assert chat.ask(FIRST, max_sentences=3, **{**SAMPLED, "seed": 8}).text() != first  # really sampled
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SAMPLED.items()]
    lines = _edge_chat(server, "--prompt", FIRST, "--max-sentences", 3, *flags)
    assert "".join(_answers(lines)[0]) == first


def test_stop_ends_after_the_sentence_being_decoded(chat):
    answer = chat.ask(FIRST, max_sentences=6)
    got = next(answer)
    answer.stop()
    assert list(answer) == [] and answer.sentences == [got]
    assert answer.end.reason == "interrupted" and answer.end.sentences == 1
    assert chat.context_sentences == answer.end.prompt_sentences + 1  # the sentence seen is in the context
    left = chat.ask(FIRST, max_sentences=6)
    next(left)  # read one sentence, then leave the answer: it is not appended
    assert chat.ask(SECOND, max_sentences=1).text()
    assert chat.context_sentences == answer.end.context_sentences + 1 + 2 + 1


def test_a_full_context_ends_the_answer_then_refuses_turns_until_reset(chat):
    long = "Yes. " * (chat.context_capacity - 4)  # room for 4 answer sentences
    answer = chat.ask(long, max_sentences=8, temperature=0.5, seed=1, stop_threshold=1.0)  # no early stop
    said = answer.text()
    assert answer.end.reason == "context_full" and answer.end.sentences == 4 and said
    assert chat.context_sentences == answer.end.context_sentences == chat.context_capacity  # the last one too
    with pytest.raises(edge.TurnError, match="leaves no room for an answer"):
        chat.ask(FIRST)
    chat.reset()
    assert chat.ask(FIRST, max_sentences=1).text()


def test_the_shipped_defaults_stop_and_do_not_repeat(chat, server):
    """edge-chat's defaults (the bundle's stop threshold, the repetition controls) are the API's: the
    same answers; the stop head ends them before the cap; no sentence is said twice."""
    prompts = [FIRST, SECOND, "The state of the Union is strong.", "In the beginning God created the heavens "
               "and the earth.", "What's your name?"]
    answers = []
    for text in prompts:
        chat.reset()
        answer = chat.ask(text, max_sentences=8)
        answers.append([s.text for s in answer])
        assert len(set(answers[-1])) == len(answers[-1]) and answers[-1]
        assert answer.end.reason in ("stop", "max_sentences")
    assert sum(len(a) < 8 for a in answers) >= 3  # the stop head ends most answers
    cli = [_answers(_edge_chat(server, "--prompt", text, "--max-sentences", 8))[0] for text in prompts]
    assert cli == answers


def test_stop_threshold_and_repetition_options(chat, server):
    options = dict(repetition_penalty=1.5, no_repeat_ngram_size=2, no_repeat_sentence=False, stop_threshold=0.3)
    api = [s.text for s in chat.ask(FIRST, max_sentences=6, **options)]
    flags = ["--repetition-penalty", 1.5, "--no-repeat-ngram-size", 2, "--allow-repeat-sentence", "--stop-threshold",
             0.3]
    assert _answers(_edge_chat(server, "--prompt", FIRST, "--max-sentences", 6, *flags)) == [api]
    chat.reset()
    once = chat.ask(FIRST, max_sentences=6, stop_threshold=0.0)  # stop at once, after the one sentence an answer has
    assert len(list(once)) == 1 and once.end.reason == "stop"
    chat.reset()
    plain = [s.text for s in chat.ask(FIRST, max_sentences=6, stop_threshold=1.0, repetition_penalty=1.0,
                                      no_repeat_ngram_size=0, no_repeat_sentence=False)]
    assert len(plain) == 6 and len(set(plain)) < 6  # without the controls the shipped model repeats itself
    for bad, message in [(dict(stop_threshold=1.5), "stop_threshold must be a number in"),
                         (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
                         (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an integer >= 0")]:
        with pytest.raises(edge.TurnError, match=message):
            chat.ask(FIRST, **bad)


# ---------------------------------------------------------------- failures, explained

def test_bad_turns_leave_the_conversation_intact(chat):
    before = chat.ask(FIRST, max_sentences=2).text()
    held = chat.context_sentences
    for bad, message in [(dict(text="  \n "), "the prompt is empty"),
                         (dict(text=FIRST, temperature=-1.0), "temperature must be >= 0"),
                         (dict(text=FIRST, top_p=0.0), "top_p must be in"),
                         (dict(text=FIRST, max_sentences=-1), "max_sentences must be an integer >= 0"),
                         (dict(text=FIRST, max_tokens=-3), "max_tokens must be an integer >= 0"),
                         (dict(text="Yes. " * 1100), "leaves no room for an answer")]:
        with pytest.raises(edge.TurnError, match=message):
            chat.ask(**bad)
        assert chat.context_sentences == held
    assert chat.ask(SECOND, max_sentences=2).text() and chat.context_sentences > held and before


def test_unknown_server_mismatched_model_and_bad_bundle(server, runtime, tmp_path):
    with pytest.raises(edge.EdgeError, match=r"cannot reach the cloud server at 127\.0\.0\.1:\d+"):
        edge.connect(f"127.0.0.1:{_free_port()}", runtime, connect_timeout=5)
    with pytest.raises(edge.EdgeError, match="must be host:port"):
        edge.connect("nowhere", runtime)
    with pytest.raises(edge.EdgeError, match="wire_dtype must be float32 or float16"):
        edge.connect(f"127.0.0.1:{server.port}", runtime, wire_dtype="int8")
    with pytest.raises(edge.EdgeError, match="cannot read the TLS CA certificate"):
        edge.connect(f"127.0.0.1:{server.port}", runtime, tls_ca=tmp_path / "missing.pem")
    with pytest.raises(edge.EdgeError, match="manifest"):
        edge.connect(f"127.0.0.1:{server.port}", tmp_path)  # not an edge bundle
    write_random_cloud_bundle(tmp_path / "cloud", model_id="sllm-another-model", d=32, layers=1, heads=2)
    with running_server(tmp_path / "cloud", threads=1) as other:
        with pytest.raises(edge.EdgeError, match="not halves of the same model.*sllm-another-model"):
            edge.connect(f"127.0.0.1:{other.port}", runtime)
    # a bundle path and float16 on the wire: connects and answers
    with edge.connect(f"127.0.0.1:{server.port}", MODEL / "edge", threads=1, wire_dtype="float16") as chat:
        assert chat.ask(FIRST, max_sentences=1).text()
    with pytest.raises(edge.EdgeError, match="closed"):
        chat.ask(FIRST)


def test_lost_server_is_an_edge_error_and_the_next_turn_rebuilds(runtime, server):
    expected = _answers(_edge_chat(server, "--max-sentences", 3, stdin=f"{FIRST}\n{SECOND}\n"))
    notes = []
    with running_server(MODEL / "cloud", threads=1) as first:
        port = first.port
        chat = edge.connect(f"127.0.0.1:{port}", runtime, notify=notes.append)
        assert [s.text for s in chat.ask(FIRST, max_sentences=3)] == expected[0]
    held = chat.context_sentences
    answer = chat.ask(SECOND, max_sentences=3)  # the turn is fine; the cloud is gone
    with pytest.raises(edge.EdgeError, match="could not be rebuilt .* cannot reach the cloud server"):
        list(answer)
    assert chat.context_sentences == held
    with running_server(MODEL / "cloud", threads=1, port=port):
        assert [s.text for s in chat.ask(SECOND, max_sentences=3)] == expected[1]
        chat.close()
    assert any(f"rebuilt it from the {held} history vectors" in n for n in notes)


def test_the_documented_example_runs_without_torch(server, tmp_path):
    """docs/edge-api.md's example, as written but for the port, with torch unimportable."""
    doc = (ROOT / "docs" / "edge-api.md").read_text()
    example = re.search(r"```python\n(.*?)```", doc, re.S).group(1).replace("127.0.0.1:50051",
                                                                           f"127.0.0.1:{server.port}")
    (tmp_path / "sitecustomize.py").write_text(NO_TORCH_BLOCKER)
    # the installed package, as a user has it (not the checkout's folders on the path)
    env = {"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", example], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # two answers (a sentence may hold a line break of the text it learned from), then the status line
    *answers, status = proc.stdout.rstrip("\n").split("\n")
    assert len(answers) >= 2 and answers[0].strip() and re.fullmatch(r"\w+ \d+ of 1024 sentences", status)


# ---------------------------------------------------------------- deadlines, keepalive, mutual TLS

class SilentRelay:
    """127.0.0.1:port -> 127.0.0.1:target. `silence()`: bytes stop flowing both ways, connections
    stay open (a host gone from the network); `resume()`: they flow again. `close()` ends it all."""

    def __init__(self, target: int):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)  # accept() wakes up to see `closed`
        self.port = self.listener.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = False
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.flowing.wait()
                if self.closed:
                    return
                dst.sendall(data)
        except OSError:
            pass

    def silence(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self.closed = True
        self.flowing.set()
        self.threads[0].join(timeout=5)
        self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self.threads:
            t.join(timeout=5)


def _failure_time(chat, **options) -> tuple[float, str]:
    """Seconds until a turn fails with EdgeError, and its message."""
    t0 = time.monotonic()
    with pytest.raises(edge.EdgeError) as e:
        chat.ask(SECOND, max_sentences=2, **options).text()
    return time.monotonic() - t0, str(e.value)


def test_a_server_silent_mid_step_fails_the_turn_at_the_step_deadline(runtime, relay):
    """No keepalive: the step deadline alone ends the wait (1 s here, 30 s by default); the next
    turn, with the server back, rebuilds the session from the history and goes on."""
    notes = []
    with edge.connect(f"127.0.0.1:{relay.port}", runtime, step_timeout=1, keepalive_s=0, notify=notes.append) as chat:
        assert chat.ask(FIRST, max_sentences=2).text()
        held = chat.context_sentences
        relay.silence()
        waited, message = _failure_time(chat)
        assert 1.0 <= waited < 4.0, waited
        assert "no answer from the cloud server" in message and "within the step deadline of 1 s" in message
        assert chat.context_sentences == held  # the prompt's step never came back: not in the history
        relay.resume()
        assert chat.ask(SECOND, max_sentences=2).text()
    assert notes and "rebuilt it from the" in notes[-1] and "DEADLINE_EXCEEDED" in notes[-1]


def test_keepalive_pings_find_a_vanished_server_without_any_deadline(runtime, relay):
    """No step deadline, pings every 1 s (30 s by default). Idle between turns: the dead connection
    is dropped (a ping not answered), so the next turn, the server back, rebuilds the session at
    once instead of writing into it. Mid-step: the turn fails (UNAVAILABLE), the rebuild that
    follows cannot reach the server either: one EdgeError, no hang."""
    notes = []
    with edge.connect(f"127.0.0.1:{relay.port}", runtime, step_timeout=0, keepalive_s=1, connect_timeout=1,
                      notify=notes.append) as chat:
        assert chat.ask(FIRST, max_sentences=2).text()
        relay.silence()
        time.sleep(3)
        relay.resume()
        assert chat.ask(SECOND, max_sentences=2).text()
        assert len(notes) == 1 and "the cloud session was lost (UNAVAILABLE" in notes[0] and "ping" in notes[0]
        relay.silence()
        waited, message = _failure_time(chat)
    assert waited < 8.0, waited
    assert "the cloud session was lost (UNAVAILABLE" in message and "could not be rebuilt" in message


def test_default_keepalive_is_within_what_the_server_accepts():
    """Every 30 s while a conversation is open, idle or not; the server takes one every 10 s at
    most (faster pings on an idle stream earn a GOAWAY after three). Nothing without a call."""
    opts = dict(channel_options())
    assert opts["grpc.keepalive_time_ms"] == DEFAULT_KEEPALIVE_S * 1000 >= SERVER_MIN_PING_INTERVAL_S * 1000
    assert opts["grpc.keepalive_timeout_ms"] == opts["grpc.http2.ping_timeout_ms"] == 10_000
    assert opts["grpc.http2.max_pings_without_data"] == 0 and opts["grpc.keepalive_permit_without_calls"] == 0
    assert "grpc.keepalive_time_ms" not in dict(channel_options(keepalive_s=0))


def test_edge_chat_step_timeout(relay):
    """edge-chat --step-timeout: a silent server ends the chat with one error line, exit 2."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "--threads", "1", "--server", f"127.0.0.1:{relay.port}", "--bundle",
         MODEL / "edge", "--max-sentences", "2", "--step-timeout", "1", "--keepalive", "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        proc.stdin.write(FIRST + "\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip()  # the first answer
        relay.silence()
        proc.stdin.write(SECOND + "\n")
        proc.stdin.close()
        assert proc.wait(timeout=20) == 2
        errors = [ln for ln in proc.stderr.read().splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "within the step deadline of 1 s" in errors[0], errors
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_deadline_and_keepalive_values_are_refused(server, runtime):
    target = f"127.0.0.1:{server.port}"
    for bad in (dict(step_timeout=-1), dict(keepalive_s=float("nan")), dict(connect_timeout=0),
                dict(step_timeout="30")):
        with pytest.raises(edge.EdgeError, match="must be a number of seconds"):
            edge.connect(target, runtime, **bad)
    r = CliRunner().invoke(app, ["--server", target, "--bundle", str(MODEL / "edge"), "--step-timeout", "-1",
                                 "--prompt", FIRST])
    assert r.exit_code == 2 and "--step-timeout" in r.stderr


# ---------------------------------------------------------------- mutual TLS

def test_client_certificates_for_a_server_that_requires_them(runtime, tmp_path):
    """--tls-cert/--tls-key (tls_cert=, tls_key=): the handshake with a server that requires a
    client certificate works with one, and fails without one or with one it does not trust."""
    paths = {}
    for who in ("server", "client", "stranger"):
        (tmp_path / who).mkdir()
        paths[who] = self_signed_cert(tmp_path / who)
    (server_cert, server_key), (client_cert, client_key) = paths["server"], paths["client"]
    with running_server(MODEL / "cloud", threads=1, tls_cert=str(server_cert), tls_key=str(server_key),
                        tls_client_ca=str(client_cert)) as srv:
        target = f"127.0.0.1:{srv.port}"
        with edge.connect(target, runtime, tls_ca=server_cert, tls_cert=client_cert, tls_key=client_key) as chat:
            assert chat.ask(FIRST, max_sentences=1).text()
        base = ["--server", target, "--bundle", str(MODEL / "edge"), "--threads", "1", "--tls-ca", str(server_cert),
                "--max-sentences", "1", "--prompt", FIRST]
        r = CliRunner().invoke(app, [*base, "--tls-cert", str(client_cert), "--tls-key", str(client_key)])
        assert r.exit_code == 0 and r.stdout.strip(), r.output
        with pytest.raises(edge.EdgeError, match="cannot reach the cloud server .* --tls-cert/--tls-key"):
            edge.connect(target, runtime, tls_ca=server_cert, connect_timeout=5)
        with pytest.raises(edge.EdgeError, match="cannot reach the cloud server"):
            edge.connect(target, runtime, tls_ca=server_cert, tls_cert=paths["stranger"][0],
                         tls_key=paths["stranger"][1], connect_timeout=5)
        r = CliRunner().invoke(app, [*base, "--tls-cert", str(client_cert)])
        assert r.exit_code == 2 and r.stderr.count("error:") == 1 and "--tls-key" in r.stderr
        r = CliRunner().invoke(app, [*base, "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(client_key)])
        assert r.exit_code == 2 and "cannot read the TLS client certificate" in r.stderr

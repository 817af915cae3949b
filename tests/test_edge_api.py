"""`import edge` (docs/edge-api.md) against a real gRPC server on 127.0.0.1 and the real exported
bundles of the bundled model (models/default): the API says what `edge-chat` prints, seeds
reproduce, a conversation carries over turns, failures are one clear EdgeError and the
conversation goes on where it can."""
import json
import re
import socket
import subprocess
import sys

import pytest
from cloud_helpers import running_server
from helpers import NO_TORCH_BLOCKER, ROOT
from typer.testing import CliRunner

import edge
from edge.cli import app
from modeling.cloud_bundle import write_random_cloud_bundle

MODEL = ROOT / "models" / "default"
FIRST, SECOND = "It is a truth universally acknowledged,", "She laughed. Then she was gone."
SAMPLED = dict(temperature=0.9, top_k=50, top_p=0.95, seed=7)


@pytest.fixture(scope="module")
def server():
    with running_server(MODEL / "cloud", threads=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def runtime():
    return edge.load_runtime(MODEL / "edge", threads=1)


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
    answer = chat.ask(FIRST, max_sentences=4)
    texts = [s.text for s in answer]
    assert len(texts) == 4 and answer.end.reason == "max_sentences"
    lines = _edge_chat(server, "--prompt", FIRST, "--max-sentences", 4)
    assert _answers(lines) == [texts]
    cli_end = lines[-1]
    assert (cli_end["reason"], cli_end["context_sentences"]) == (answer.end.reason, answer.end.context_sentences)
    plain = CliRunner().invoke(app, ["--server", f"127.0.0.1:{server.port}", "--bundle", str(MODEL / "edge"),
                                     "--threads", "1", "--prompt", FIRST, "--max-sentences", "4"])
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
    alone = chat.ask(SECOND, max_sentences=3)
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
    answer = chat.ask(long, max_sentences=8, temperature=0.5, seed=1)  # sampled: no early stop here
    said = answer.text()
    assert answer.end.reason == "context_full" and answer.end.sentences == 4 and said
    assert chat.context_sentences == answer.end.context_sentences == chat.context_capacity  # the last one too
    with pytest.raises(edge.TurnError, match="leaves no room for an answer"):
        chat.ask(FIRST)
    chat.reset()
    assert chat.ask(FIRST, max_sentences=1).text()


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
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", example], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and lines[0] and lines[1] and re.fullmatch(r"\w+ \d+ of 1024 sentences", lines[2])

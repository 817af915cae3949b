"""`edge-chat` driven as a user: piped stdin against `--local`, the REPL under a pseudo-terminal,
a server restarted mid-conversation; greedy answers equal the torch reference. The edge runs
with torch and transformers unimportable; every failure is one `error:` line and exit code 2.

One tiny SLLM is trained (SentenceVAE 600 steps, SLLM 300 steps: enough for varied sentences
and a stop head that does not stop at once) and exported once for the whole module."""
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cloud_helpers import running_server
from helpers import NO_TORCH_BLOCKER, ROOT, sllm_overrides, tiny_overrides, train_run
from typer.testing import CliRunner

from sllm.edge.chat import EdgeError
from sllm.edge.cli import app
from sllm.edge.local import LocalServer
from sllm.edge.loop import sentence_loop
from sllm.edge.runtime import Decoded, EdgeRuntime
from sllm.runtime.sampling import Sampling, filter_logits, numpy_generator, pick_next
from sllm.export.exporter import export_checkpoint
from sllm.modeling.cloud_bundle import write_random_cloud_bundle
from sllm.modeling.generate import SamplingConfig, decode_sentences
from sllm.modeling.generate import pick_next as torch_pick_next
from sllm.modeling.opt_graft import STOP
from sllm.modeling.sllm_generate import SLLMGenerator
from sllm.sentences.sampling import (
    DEFAULT_NO_REPEAT_NGRAM,
    DEFAULT_NO_REPEAT_SENTENCE,
    DEFAULT_REPETITION_PENALTY,
    AnswerOptions,
    stop_decision,
)
from sllm.protos.client import StepResult
from sllm.runtime.providers import CPU, ProviderError, open_sessions
from sllm.training.cli import build_run_config
from sllm.training.config import SLLMRunConfig
from sllm.training.load import load_sllm
from sllm.training.tasks.sentence_vae import SentenceVAETask
from sllm.training.tasks.sllm import SLLMTask

CAP = 4  # --max-sentences in the comparisons (the torch reference uses the same cap)
TOKEN = "edge-test-token"
CANDIDATES = ["The king loves the river.", "My sister remembers the garden,", "Hello.",
              "A small dog sees a letter. She builds the city!", "The people guards her book; He finds a song?",
              "Our nation praises the law.", "He leaves the city."]
ANSI = re.compile(rb"\x1b\[[0-9;?]*[a-zA-Z]")
runner = CliRunner()


# ---------------------------------------------------------------- one model for the module

@pytest.fixture(scope="module")
def model(tiny_corpus, tmp_path_factory):
    """(export dir with edge/ and cloud/, trained SLLM run dir)."""
    out = tmp_path_factory.mktemp("edge_model")
    overrides = tiny_overrides(tiny_corpus, out / "c1") + ["train.max_steps=600"]
    train_run(type(build_run_config(None, [], None)), SentenceVAETask, overrides, out / "s1")
    overrides = sllm_overrides(tiny_corpus, out / "c2") + [f"sllm.svae_checkpoint={out / 's1'}",
                                                         "train.max_steps=300"]
    train_run(SLLMRunConfig, SLLMTask, overrides, out / "s2")
    export_checkpoint(out / "s2", out / "export", n_verify=4)
    return out / "export", out / "s2"


@pytest.fixture(scope="module")
def trained(model):
    """The trained SLLM in torch, with the stop threshold its export chose (the edge's default)."""
    t = load_sllm(model[1])
    t.stop_threshold = json.loads((model[0] / "edge" / "manifest.json").read_text()).get("stop_threshold")
    return t


# edge-chat's default decoding (greedy with its repetition controls)
CHAT = SamplingConfig(repetition_penalty=DEFAULT_REPETITION_PENALTY, no_repeat_ngram_size=DEFAULT_NO_REPEAT_NGRAM,
                      no_repeat_sentence=DEFAULT_NO_REPEAT_SENTENCE)


def reference_conversation(trained, turns: list[str], cap, sampling: SamplingConfig = CHAT,
                           threshold: float | None | str = "bundle") -> list[list[str]]:
    """The torch reference loop (SLLMGenerator.generate's rules) over several turns with one KV
    cache: each turn appends its prompt's vectors, then generates until stop (P(stop) >= the
    threshold, from the second sentence on; "bundle": the export's) / empty / a repeat the
    sentence guard could not avoid / cap (one cap, or one per turn)."""
    caps = cap if isinstance(cap, list) else [cap] * len(turns)
    threshold = trained.stop_threshold if threshold == "bundle" else threshold
    sllm, tok = trained.model.eval(), trained.tokenizer
    gen = SLLMGenerator(sllm, tok, trained.run.data.split_on_comma)
    slot, used, answers = sllm.opt.new_slot(), 0, []
    with torch.inference_mode():
        for text, cap in zip(turns, caps):
            prompt = gen.prompt_sentences(text)
            limit = min(cap, sllm.opt.max_sentences - used - len(prompt))
            hidden, stop = gen.step(slot, gen.encode(prompt))
            used += len(prompt)
            out, said = [], []
            for i in range(limit):
                p_stop = float(stop[0, -1].float().softmax(-1)[STOP])
                if i >= 1 and stop_decision(int(stop[0, -1].argmax()) == STOP, p_stop, threshold):
                    break
                ids = decode_sentences(sllm.svae.decoder, hidden[:, -1], gen.max_tokens, sampling.for_sentence(i),
                                       said)[0]
                if not ids or (sampling.no_repeat_sentence and ids in said):
                    break
                said.append(ids)
                out.append(tok.decode(ids))
                hidden, stop = gen.step(slot, gen.encode([ids]))
                used += 1
            answers.append(out)
    return answers


@pytest.fixture(scope="module")
def prompts(trained):
    """Two prompts whose greedy answers (cap CAP) hold sentences, in turn 1 and in turn 2."""
    gen = SLLMGenerator(trained.model, trained.tokenizer, trained.run.data.split_on_comma)
    for first in CANDIDATES:
        if len(list(gen.generate(first, CAP, CHAT, trained.stop_threshold))) < 2:
            continue
        for second in CANDIDATES:
            if second != first and all(reference_conversation(trained, [first, second], CAP)):
                return first, second
    pytest.fail("no candidate prompt makes the tiny model answer: train it longer")


@pytest.fixture(scope="module")
def server(model):
    """An in-process server with a token; each step waits 30 ms (time to press Ctrl-C mid-answer)."""
    with running_server(model[0] / "cloud", tokens=[TOKEN], batch_wait_ms=30.0, threads=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("no_torch")
    (d / "sitecustomize.py").write_text(NO_TORCH_BLOCKER)
    return d


def _env(no_torch: Path | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    env.pop("SLLM_CLOUD_TOKEN", None)
    if no_torch is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(no_torch), str(ROOT)])
    return env


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "edge", "--threads", "1", *map(str, args)]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_reference_conversation_turn_one_is_sllm_generator(trained, prompts):
    gen = SLLMGenerator(trained.model, trained.tokenizer, trained.run.data.split_on_comma)
    ref = reference_conversation(trained, list(prompts), CAP)
    assert ref[0] == [s.text for s in gen.generate(prompts[0], CAP, CHAT, trained.stop_threshold)]
    assert len(ref[0]) >= 2 and ref[1]


# ---------------------------------------------------------------- as a user

def test_piped_stdin_with_local_server_equals_torch(model, trained, prompts):
    """`edge-chat --local`: server subprocess on a free port with a random token, one turn per
    line, the session kept across turns, greedy text == torch, no server left behind."""
    ref = reference_conversation(trained, list(prompts), CAP)
    proc = subprocess.run(_cmd("--local", "--model", model[0], "--max-sentences", CAP),
                          input=f"{prompts[0]}\n\n{prompts[1]}\n", capture_output=True, text=True,
                          cwd=ROOT, env=_env(), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["".join(ref[0]), "".join(ref[1])]
    pid = int(re.search(r"local cloud server \(pid (\d+)\) at 127\.0\.0\.1:\d+", proc.stderr).group(1))
    assert _gone(pid), "the local server outlived edge-chat"
    assert "Traceback" not in proc.stderr


def test_local_server_is_stopped_when_the_chat_is_terminated_or_killed(model):
    """SIGTERM: edge-chat stops its server on the way out. SIGKILL: the server gets SIGTERM from
    the kernel (PR_SET_PDEATHSIG) and goes too. Either way no server is left running."""
    procs = [subprocess.Popen(_cmd("--local", "--model", model[0], "--json", *extra), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
             for extra in ((), ("--speculate", "3"))]  # both start at once: one server start-up's worth of waiting
    try:
        ready = [json.loads(p.stdout.readline() or "{}") for p in procs]
        assert all(r.get("event") == "ready" for r in ready), procs[0].stderr.read()[-3000:]
        # a local server is not asked to speculate unless told to; the export's svae/ lets it grant what is asked
        assert [(r["speculate_asked"], r["speculate"]) for r in ready] == [(0, 0), (3, 3)]
        pids = [r["local_server_pid"] for r in ready]
        assert not any(_gone(pid) for pid in pids)
        procs[0].send_signal(signal.SIGTERM)
        procs[1].kill()
        assert procs[0].wait(timeout=30) == 128 + signal.SIGTERM
        assert _gone(pids[0])  # stopped and reaped before edge-chat exited
        procs[1].wait(timeout=30)
        deadline = time.monotonic() + 30
        while not _gone(pids[1]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(pids[1]), "the server outlived a killed edge-chat"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _child_state(proc: subprocess.Popen, fd: int) -> str:
    """Why a pty child is silent: its kernel state, then its Python stacks (faulthandler on SIGABRT)."""
    try:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        state = next(ln for ln in status.splitlines() if ln.startswith("State"))
        wchan = Path(f"/proc/{proc.pid}/wchan").read_text()
    except (OSError, StopIteration):
        return f"child {proc.pid} gone (exit {proc.poll()})"
    import fcntl
    import termios
    import traceback
    fds = {n: os.readlink(f"/proc/{proc.pid}/fd/{n}") for n in ("0", "1", "2")}
    ptn = fcntl.ioctl(fd, 0x80045430, b"\0\0\0\0")  # TIOCGPTN: the master's pts number
    queued = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    state += f" fds {fds} master pts {int.from_bytes(ptn, 'little')} fd {fd} -> {os.readlink(f'/proc/self/fd/{fd}')}"
    state += f" queued {int.from_bytes(queued, 'little')}\n"
    for task in sorted(Path(f"/proc/{proc.pid}/task").iterdir()):  # signals blocked / pending per thread
        try:
            sig = [ln for ln in (task / "status").read_text().splitlines() if ln.startswith(("Sig", "ShdPnd"))]
            state += f"  task {task.name} wchan {(task / 'wchan').read_text()}: {' '.join(sig)}\n"
        except OSError:
            pass
    state += "this process's threads:\n"
    for ident, frame in sys._current_frames().items():
        state += f"--- {ident}\n" + "".join(traceback.format_stack(frame)[-4:])
    proc.send_signal(signal.SIGABRT)
    dump, deadline = b"", time.monotonic() + 5
    while time.monotonic() < deadline and select.select([fd], [], [], 0.5)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        dump += chunk
    return f"child {proc.pid}: {state}, wchan {wchan}\n{dump.decode(errors='replace')[-6000:]}"


def _read_until(fd: int, marker: bytes, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> bytes:
    buf, deadline = b"", time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            why = _child_state(proc, fd) if proc is not None else ""
            raise AssertionError(f"timed out waiting for {marker!r}; got {buf[-2000:]!r}\n{why}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        if not chunk:
            raise AssertionError(f"the terminal closed before {marker!r}; got {buf[-2000:]!r}")
        buf += chunk
    return buf


class _Pty:
    """edge-chat on a pseudo-terminal that is its controlling terminal (so ^C is SIGINT)."""

    def __init__(self, args, env):
        self.master, slave = pty.openpty()
        # The terminal becomes the controlling tty in the new process, after exec: a Python
        # preexec_fn would run between fork and exec, where gRPC threads of this test process
        # (in-process servers) can leave locks held and the child hangs before it starts.
        # SIGINT back to its default first, as a shell starts a program at a terminal: a test run
        # launched in the background (`cmd &` without job control) ignores SIGINT, an ignored signal
        # stays ignored across exec, and Python then installs no KeyboardInterrupt handler, so ^C did
        # nothing (both ^C tests failed that way once).
        take_tty = ("import fcntl, os, signal, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                    "signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])")
        env = {**env, "PYTHONFAULTHANDLER": "1"}  # a silent child shows its stacks (see _child_state)
        self.proc = subprocess.Popen([sys.executable, "-c", take_tty, *map(str, args)], stdin=slave,
                                     stdout=slave, stderr=slave, cwd=ROOT, env=env, start_new_session=True)
        os.close(slave)

    def ask(self, line: str, timeout: float = 60.0) -> str:
        """Type a line, return what came back before the next prompt (echo removed)."""
        os.write(self.master, line.encode() + b"\r")
        out = self.read_until(b"\r\n> ", timeout)
        text = ANSI.sub(b"", out[: out.rindex(b"\r\n> ")]).decode()
        echo = line + "\r\n"
        assert text.startswith(echo), text
        return text[len(echo):]

    def read_until(self, marker: bytes, timeout: float = 120.0) -> bytes:
        return _read_until(self.master, marker, timeout, self.proc)

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.kill()

    def kill(self) -> None:
        """Kill the child if it still runs, reap it, close the terminal (once)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


def test_repl_under_a_terminal_equals_torch(model, trained, prompts, server, no_torch):
    """The interactive REPL (torch unimportable): answers == torch turn by turn, /help, /reset
    starts over, /quit leaves with code 0."""
    ref = reference_conversation(trained, list(prompts), CAP)
    term = _Pty(_cmd("--server", f"127.0.0.1:{server.port}", "--bundle", model[0] / "edge",
                     "--max-sentences", CAP), {**_env(no_torch), "SLLM_CLOUD_TOKEN": TOKEN})
    try:
        banner = term.read_until(b"> ").decode()
        assert "edge-chat" in banner and "/help" in banner
        assert "speculation: off" in banner  # a server on this machine is not asked to speculate
        assert term.ask(prompts[0]) == "".join(ref[0])
        assert "/reset" in term.ask("/help")
        assert term.ask(prompts[1]) == "".join(ref[1])  # turn 2 sees turn 1
        assert "new conversation" in term.ask("/reset")
        assert term.ask(prompts[0]) == "".join(ref[0])  # a fresh session
        os.write(term.master, b"/quit\r")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def _until_turn_end(term: _Pty, timeout: float) -> dict:
    out = ANSI.sub(b"", term.read_until(b"\r\n> ", timeout)).decode()
    line = next(ln for ln in out.splitlines() if '"turn_end"' in ln)
    # after the terminal's echo of ^C, or a sentence line the ^C flushed half of
    return json.loads(line[line.index('{"event": "turn_end"'):])


def test_ctrl_c_stops_the_answer_and_keeps_the_session(model, prompts, server, no_torch):
    """^C mid-answer (a 200-sentence cap, 30 ms a cloud step) stops after the sentence being
    decoded; the next turn continues the same session; ^C at the prompt, sent the moment the
    prompt appears, only clears the line (edge.cli._prompt_input: it once hung here, one run in a
    few, the ^C landing before readline's select() and left pending)."""
    term = _Pty(_cmd("--server", f"127.0.0.1:{server.port}", "--bundle", model[0] / "edge", "--json",
                     "--max-sentences", 200, "--stop-threshold", 1, "--token", TOKEN), _env(no_torch))
    try:
        term.read_until(b"> ", 120)  # start-up: imports and the bundle, slow on a loaded machine
        ends = []
        for text in prompts:
            os.write(term.master, text.encode() + b"\r")
            term.read_until(b'"event": "sentence"', 60)  # the answer is under way
            os.write(term.master, b"\x03")
            ends.append(_until_turn_end(term, 60))
            assert ends[-1]["reason"] == "interrupted" and 1 <= ends[-1]["sentences"] < 200
            os.write(term.master, b"\x03")  # ^C at the prompt: a fresh prompt, nothing else
            term.read_until(b"\r\n> ", 30)
        first, second = ends
        assert first["context_sentences"] == first["prompt_sentences"] + first["sentences"]
        # the same session: turn 2, on top of everything turn 1 left (the printed sentences included)
        assert second["turn"] == 2
        assert second["context_sentences"] == first["context_sentences"] + second["prompt_sentences"] + \
            second["sentences"]
        os.write(term.master, b"\x04")  # Ctrl-D leaves
        assert term.close() == 0
    finally:
        term.kill()


MISSED_CTRL_C = """
import readline, signal, sys, threading, time
from pathlib import Path
from sllm.edge.cli import _prompt_input

def ctrl_c_the_prompt_does_not_see():
    # once the main thread waits in readline's select(), a SIGINT whose C handler runs in this
    # thread: the flag is set, the select() goes on (as for one that lands just before it)
    wchan = Path(f"/proc/self/task/{threading.main_thread().native_id}/wchan")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(w in wchan.read_text() for w in ("poll", "select")):
        time.sleep(0.01)
    time.sleep(0.2)
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)

threading.Thread(target=ctrl_c_the_prompt_does_not_see, daemon=True).start()
t0 = time.monotonic()
try:
    _prompt_input("> ")
except KeyboardInterrupt:
    print(f"interrupted after {time.monotonic() - t0:.1f} s")
"""


def test_a_ctrl_c_the_prompt_misses_still_clears_the_line(no_torch):
    """The race behind the Ctrl-C test's old hang, made certain: a SIGINT that readline's select()
    does not see (CPython acts on it only when that select() is interrupted) is acted on within
    PROMPT_TICK_S, not left pending until the next key, which it would then swallow."""
    term = _Pty([sys.executable, "-c", MISSED_CTRL_C], _env(no_torch))
    try:
        out = term.read_until(b"interrupted after", 60)
        assert out.startswith(b"> ")
        assert term.close() == 0
    finally:
        term.kill()


def test_server_restart_mid_conversation_rebuilds_the_session(model, trained, prompts, no_torch):
    """Kill the server between turns, start another on the same port: the next turn rebuilds the
    session from the edge's history vectors (said on stderr) and answers exactly as if nothing
    happened; with no server back, the turn fails with exit 2 and says why."""
    ref = reference_conversation(trained, list(prompts), CAP)
    cloud = model[0] / "cloud"
    proc = None

    def ask(text: str) -> tuple[list[str], dict]:
        proc.stdin.write(text + "\n")
        proc.stdin.flush()
        texts = []
        while True:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-3000:]
            ev = json.loads(line)
            if ev["event"] == "sentence":
                assert {"edge_encode_ms", "cloud_step_ms", "edge_decode_ms"} <= set(ev)
                texts.append(ev["text"])
            elif ev["event"] == "turn_end":
                return texts, ev

    try:
        with running_server(cloud, threads=1) as first:
            port = first.port
            proc = subprocess.Popen(_cmd("--server", f"127.0.0.1:{port}", "--bundle", model[0] / "edge", "--json",
                                         "--max-sentences", CAP), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env(no_torch))
            assert json.loads(proc.stdout.readline())["event"] == "ready"
            texts, end = ask(prompts[0])
            assert texts == ref[0]
        # that server is gone, with the session; another one on the same port
        with running_server(cloud, threads=1, port=port):
            texts, end2 = ask(prompts[1])
            assert texts == ref[1]
            assert end2["context_sentences"] == end["context_sentences"] + end2["prompt_sentences"] + len(texts)
        proc.stdin.write(prompts[0] + "\n")  # and now no server at all
        proc.stdin.flush()
        code = proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    assert f"rebuilt it from the {end['context_sentences']} history vectors" in err
    assert code == 2
    assert re.search(r"error: the cloud session was lost .* could not be rebuilt from the \d+ history vectors "
                     r"the edge keeps: cannot reach the cloud server", err, re.S)
    assert "Traceback" not in err


def test_aborted_answer_is_rebuilt_from_history(model, trained, prompts, server):
    """A second Ctrl-C (KeyboardInterrupt mid-answer) drops the stream; the next turn rebuilds the
    session from the history (prompt + the one sentence already appended) and goes on exactly as
    torch does for that conversation."""
    from sllm.edge.chat import ChatSession
    from sllm.edge.loop import SentenceEvent
    from sllm.edge.remote import RemoteStepper
    from sllm.protos.client import CloudClient

    notes = []
    rt = EdgeRuntime.load(model[0] / "edge", threads=1)
    chat = ChatSession(rt, RemoteStepper(rt.bundle, lambda: CloudClient(f"127.0.0.1:{server.port}", TOKEN), "test",
                                         notify=notes.append))
    chat.connect()
    plain = AnswerOptions(repetition_penalty=1.0, no_repeat_ngram_size=0, no_repeat_sentence=False, max_sentences=CAP)
    calls = []

    def second_ctrl_c() -> bool:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return False

    got = []
    with pytest.raises(KeyboardInterrupt):
        for ev in chat.turn(prompts[0], plain, interrupted=second_ctrl_c):
            got.append(ev)
    held = len(rt.prompt_sentences(prompts[0])) + 1
    assert len(got) == 1 and chat.stepper.conv is None and len(chat.stepper.history) == held
    texts = [ev.text for ev in chat.turn(prompts[1], plain) if isinstance(ev, SentenceEvent)]
    assert texts == reference_conversation(trained, list(prompts), [1, CAP], SamplingConfig())[1]
    assert notes == [f"the cloud session was lost (an answer was aborted mid-step); rebuilt it from the "
                     f"{len(rt.prompt_sentences(prompts[0])) + 1} history vectors the edge keeps"]
    chat.close()


LONG = 8  # a cap long enough for the tiny model to repeat itself


@pytest.mark.parametrize("sampling, threshold", [
    (SamplingConfig(), None),  # no controls, the head's argmax (as before thresholds existed)
    (SamplingConfig(repetition_penalty=1.5), "bundle"),
    (SamplingConfig(no_repeat_ngram_size=2), 0.3),
    (SamplingConfig(no_repeat_sentence=True), "bundle"),
    (SamplingConfig(repetition_penalty=1.3, no_repeat_ngram_size=3, no_repeat_sentence=True), 0.2),
    (SamplingConfig(temperature=0.0, repetition_penalty=0.7), 1.0),  # < 1 favours repeats; 1.0: never stops
])
def test_repetition_controls_and_stop_threshold_equal_torch(model, trained, prompts, server, sampling, threshold):
    """The edge (ONNX decoder, numpy controls, a real server's P(stop)) gives the torch reference's
    greedy text with the repetition controls on and any stop threshold, turn after turn."""
    from sllm.edge.api import connect

    options = AnswerOptions(max_sentences=LONG, repetition_penalty=sampling.repetition_penalty,
                            no_repeat_ngram_size=sampling.no_repeat_ngram_size,
                            no_repeat_sentence=sampling.no_repeat_sentence,
                            stop_threshold=None if threshold in ("bundle", None) else threshold)
    with connect(f"127.0.0.1:{server.port}", EdgeRuntime.load(model[0] / "edge", threads=1), token=TOKEN,
                 options=options) as chat:
        if threshold is None:  # the head's own flag: a threshold of 0.5 but for exact ties
            chat.session.runtime.bundle.manifest.pop("stop_threshold", None)
        answers = [[s.ids for s in chat.ask(text)] for text in prompts]
    ref = reference_conversation(trained, list(prompts), LONG, sampling, threshold)
    assert [[trained.tokenizer.decode(ids) for ids in a] for a in answers] == ref
    assert any(answers)
    for a in answers:
        tokens = [t for ids in a for t in ids]
        n = sampling.no_repeat_ngram_size
        if n:
            grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
            assert len(grams) == len(set(grams)), "an n-gram repeats"
        if sampling.no_repeat_sentence:
            assert len({tuple(ids) for ids in a}) == len(a), "a sentence repeats"


def test_the_controls_change_what_the_tiny_model_says(trained, prompts):
    """They are not no-ops here: the tiny model repeats itself without them, and each one changes
    its greedy answer or stops a repeat."""
    plain = reference_conversation(trained, [prompts[0]], LONG, SamplingConfig(), 1.0)[0]
    assert len(plain) == LONG and len(set(plain)) < len(plain)  # loops, as the shipped model did
    for sampling in (SamplingConfig(repetition_penalty=1.5), SamplingConfig(no_repeat_ngram_size=2),
                     SamplingConfig(no_repeat_sentence=True)):
        assert reference_conversation(trained, [prompts[0]], LONG, sampling, 1.0)[0] != plain, sampling


def test_edge_chat_repetition_and_threshold_options_equal_torch(model, trained, prompts, server):
    sampling = SamplingConfig(repetition_penalty=1.3, no_repeat_ngram_size=3, no_repeat_sentence=True)
    proc = subprocess.run(_cmd("--server", f"127.0.0.1:{server.port}", "--bundle", model[0] / "edge", "--token",
                               TOKEN, "--max-sentences", LONG, "--repetition-penalty", 1.3, "--no-repeat-ngram-size",
                               3, "--no-repeat-sentence", "--stop-threshold", 0.2, "--prompt", prompts[0]),
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "".join(reference_conversation(trained, [prompts[0]], LONG, sampling, 0.2)[0]) + "\n"
    bad = subprocess.run(_cmd("--server", f"127.0.0.1:{server.port}", "--bundle", model[0] / "edge", "--token",
                              TOKEN, "--repetition-penalty", 0, "--prompt", prompts[0]),
                         capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=180)
    assert bad.returncode == 2 and "repetition_penalty must be > 0" in bad.stderr


# ---------------------------------------------------------------- failures, explained

def _invoke(args) -> object:
    r = runner.invoke(app, ["--threads", "1", *map(str, args)])
    assert "Traceback" not in r.output
    return r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_wrong_token_and_mismatched_halves(model, server, tmp_path):
    edge = model[0] / "edge"
    r = _invoke(["--server", f"127.0.0.1:{_free_port()}", "--bundle", edge, "--prompt", "Hello."])
    assert r.exit_code == 2 and "error: cannot reach the cloud server at 127.0.0.1:" in r.stderr
    r = _invoke(["--server", f"127.0.0.1:{server.port}", "--bundle", edge, "--prompt", "Hello.", "--token", "nope"])
    assert r.exit_code == 2 and "refused the bearer token (invalid bearer token)" in r.stderr
    r = _invoke(["--server", f"127.0.0.1:{server.port}", "--bundle", edge, "--prompt", "Hello."])  # no token
    assert r.exit_code == 2 and "refused the bearer token" in r.stderr
    other = tmp_path / "other"
    write_random_cloud_bundle(other / "cloud", model_id="sllm-another-model", d=32, layers=1, heads=2)
    with running_server(other / "cloud", threads=1) as srv:
        r = _invoke(["--server", f"127.0.0.1:{srv.port}", "--bundle", edge, "--prompt", "Hello."])
    assert r.exit_code == 2 and "not halves of the same model" in r.stderr and "sllm-another-model" in r.stderr
    shutil.copytree(edge, other / "edge")  # --local refuses before starting anything
    r = _invoke(["--local", "--model", other, "--prompt", "Hello."])
    assert r.exit_code == 2 and "not halves of the same model" in r.stderr and "refusing to start" in r.stderr


def test_tls_and_token_over_the_wire(model, trained, prompts, tmp_path):
    """--tls-ca + --token against a TLS server: the answer equals torch; a plaintext client (named as
    such) or an untrusted certificate is a clear error."""
    from cloud_helpers import self_signed_cert

    cert, key = self_signed_cert(tmp_path)
    edge = model[0] / "edge"
    with running_server(model[0] / "cloud", tokens=[TOKEN], tls_cert=str(cert), tls_key=str(key), threads=1) as srv:
        base = ["--bundle", edge, "--token", TOKEN, "--max-sentences", CAP, "--prompt", prompts[0]]
        r = _invoke(["--server", f"127.0.0.1:{srv.port}", "--tls-ca", cert, *base])
        assert r.exit_code == 0, r.output
        assert r.stdout == "".join(reference_conversation(trained, [prompts[0]], CAP)[0]) + "\n"
        r = _invoke(["--server", f"127.0.0.1:{srv.port}", *base])
        assert r.exit_code == 2 and f"error: the cloud server at 127.0.0.1:{srv.port} speaks TLS and this client " \
                                    "plaintext: pass --tls-ca" in r.stderr, r.stderr
        (tmp_path / "other").mkdir()
        other, _ = self_signed_cert(tmp_path / "other")
        r = _invoke(["--server", f"127.0.0.1:{srv.port}", "--tls-ca", other, *base])
        assert r.exit_code == 2 and "error: cannot reach the cloud server" in r.stderr
        r = _invoke(["--server", f"127.0.0.1:{srv.port}", "--tls-ca", tmp_path / "missing.pem", *base])
        assert r.exit_code == 2 and "error: cannot read the TLS CA certificate" in r.stderr


def _flip_byte(path: Path, at: int = 200) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupted_bundles_are_refused(model, tmp_path):
    """A flipped byte in the edge bundle: refused on load. In the cloud bundle (--local): the
    server dies at start and its last log lines are shown."""
    bad = shutil.copytree(model[0], tmp_path / "bad")
    _flip_byte(bad / "edge" / "decoder.onnx")
    r = _invoke(["--bundle", bad / "edge", "--prompt", "Hello."])
    assert r.exit_code == 2 and "decoder.onnx does not match its manifest hash" in r.stderr
    bad = shutil.copytree(model[0], tmp_path / "bad_cloud")
    _flip_byte(bad / "cloud" / "cloud.safetensors")
    r = _invoke(["--local", "--model", bad, "--prompt", "Hello."])
    assert r.exit_code == 2, r.output
    assert "the local cloud server exited (code 2) before it was ready" in r.stderr
    assert "cloud.safetensors does not match its manifest hash" in r.stderr  # its own stderr, shown


def test_local_server_that_never_gets_healthy_is_stopped(tmp_path):
    script = tmp_path / "fake_server.py"
    script.write_text(textwrap.dedent("""\
        import json, sys, time
        print(json.dumps({"event": "server_start", "address": "127.0.0.1:9"}), flush=True)
        time.sleep(120)
        """))
    server = LocalServer(tmp_path, startup_timeout=1.0, command=[sys.executable, str(script)])
    with pytest.raises(EdgeError, match=r"not healthy \(SERVING\) within 1 s; its last lines:\n.*server_start"):
        server.start()
    assert server.proc.poll() is not None  # stopped, not orphaned


# ---------------------------------------------------------------- torch-free, providers, sampling

def test_every_edge_module_imports_and_runs_without_torch(model, no_torch):
    code = textwrap.dedent(f"""\
        import importlib, pkgutil, sys
        from sllm import edge
        heavy = [m for m in ("onnxruntime", "grpc", "tokenizers", "numpy") if m in sys.modules]
        assert not heavy, f"import edge loaded {{heavy}}"
        assert edge.EdgeChat.__module__ == "sllm.edge.api"  # the API, imported on first use
        names = [m.name for m in pkgutil.walk_packages(edge.__path__, "sllm.edge.") if m.name != "sllm.edge.__main__"]
        for name in names:
            importlib.import_module(name)
        from sllm.edge.runtime import EdgeRuntime
        from sllm.runtime.sampling import Sampling
        rt = EdgeRuntime.load({str(model[0] / "edge")!r}, threads=1)
        v = rt.encode(rt.prompt_sentences("The king loves the river. Hello!"))
        d = rt.decode(v[0], Sampling(temperature=0.8, top_k=20, top_p=0.9, seed=3))
        assert v.shape == (2, rt.d_model) and d.ids and rt.provider == "CPUExecutionProvider"
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker let torch in")
        # the edge imports only edge, runtime, protos, sentences (+ numpy, grpc, typer, ORT, tokenizers)
        bad = [m for m in ("torch", "transformers", "onnx", "sllm.modeling", "sllm.cloud", "sllm.training", "sllm.export", "bench")
               if m in sys.modules]
        assert not bad, bad
        print("ok", len(names))
        """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(no_torch), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = [f for f in (ROOT / "edge").glob("*.py") if f.stem not in ("__init__", "__main__")]
    assert proc.stdout.split() == ["ok", str(len(modules))]  # every module of edge/ was imported
    assert proc.stderr == ""  # no ORT provider errors on a CPU-only machine


def test_cuda_is_used_only_when_it_really_loads(model, monkeypatch, capfd):
    import onnxruntime as ort

    from sllm.runtime import providers

    paths = [str(model[0] / "edge" / "encoder.onnx"), str(model[0] / "edge" / "decoder.onnx")]
    sessions, provider, note = open_sessions(paths, "cpu", threads=1)
    assert provider == CPU and note == "" and sessions[0].get_providers() == [CPU]
    # pretend an NVIDIA device is present: the real CUDA provider is tried (here it cannot load:
    # no CUDA libraries) and the edge falls back to the CPU quietly, with the reason
    monkeypatch.setattr(providers.glob, "glob", lambda pattern: ["/dev/nvidia0"])
    sessions, provider, note = open_sessions(paths, "auto", threads=1)
    if providers.CUDA not in ort.get_available_providers():  # a CPU build: CUDA is not even tried
        assert provider == CPU and note == ""
        with pytest.raises(ProviderError, match="--device cuda: this onnxruntime build .* has no CUDA provider"):
            open_sessions(paths, "cuda", threads=1)
    elif provider == CPU:
        assert "CUDA" in note and all(s.get_providers() == [CPU] for s in sessions)
        with pytest.raises(ProviderError, match="--device cuda: "):
            open_sessions(paths, "cuda", threads=1)
    else:  # a machine where CUDA really loads
        assert provider == "CUDAExecutionProvider" and all(s.get_providers()[0] == provider for s in sessions)
    # a GPU build that claims CUDA but falls back to the CPU without raising: not counted as CUDA
    real = ort.InferenceSession

    class FallsBack(real):
        def __init__(self, path, opts=None, providers=None, **kw):
            super().__init__(path, opts, providers=[p for p in providers if p == CPU], **kw)

    monkeypatch.setattr(ort, "InferenceSession", FallsBack)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [providers.CUDA, CPU])
    sessions, provider, note = open_sessions(paths, "auto", threads=1)
    assert provider == CPU and "CUDA provider did not load" in note
    monkeypatch.undo()
    rt = EdgeRuntime.load(model[0] / "edge", device="auto", threads=1)  # as it is on this machine
    assert rt.provider in (CPU, "CUDAExecutionProvider")
    assert capfd.readouterr().err == ""  # ORT printed nothing


def test_sampling_matches_torch_and_seeds_reproduce(monkeypatch):
    """The distribution each step draws from equals the torch reference's (its pick_next, with
    torch.multinomial intercepted); greedy is argmax; a seed reproduces."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 50)).astype(np.float32) * 3
    logits[0, :5] = logits[0, 5]  # ties at the top-k boundary
    seen = {}

    def fake_multinomial(probs, n, generator=None):
        seen["probs"] = probs.clone()
        return torch.zeros((probs.shape[0], n), dtype=torch.long)

    monkeypatch.setattr(torch, "multinomial", fake_multinomial)
    for cfg in [dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.6),
                dict(temperature=1.0, top_k=10, top_p=0.8), dict(temperature=0.5, top_p=1e-6)]:
        torch_pick_next(torch.as_tensor(logits), SamplingConfig(**cfg))
        x = filter_logits(logits, Sampling(**cfg)).astype(np.float64)
        ours = np.exp(x - x.max(-1, keepdims=True))
        ours /= ours.sum(-1, keepdims=True)
        np.testing.assert_allclose(ours, seen["probs"].numpy(), atol=1e-6, err_msg=str(cfg))
        picks = {int(pick_next(logits[:1], Sampling(**cfg, seed=7), numpy_generator(Sampling(**cfg, seed=7)))[0])
                 for _ in range(3)}
        assert len(picks) == 1 and ours[0, picks.pop()] > 0  # seeded: reproducible, an allowed token
    monkeypatch.undo()
    assert (pick_next(logits, Sampling(), None) == torch_pick_next(torch.as_tensor(logits), SamplingConfig())
            .numpy()).all()
    draws = [int(pick_next(logits[1:2], Sampling(temperature=1.0), np.random.default_rng(i))[0]) for i in range(200)]
    assert len(set(draws)) > 5  # really sampling
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1.0, top_p=0)
    assert Sampling(seed=5).for_sentence(2).seed == 7 and Sampling().for_sentence(2).seed is None


def test_repetition_controls_are_the_same_in_numpy_and_torch():
    """The guard's bookkeeping (shared) and its application to logits (numpy on the edge, torch in the
    reference): bit-identical float32 logits, the n-gram ban across a sentence boundary, the penalty's
    sign rule, eos banned only where the sentence would equal an earlier one."""
    from sllm.runtime.sampling import control_repetition
    from sllm.modeling.generate import control_repetition as torch_control_repetition
    from sllm.sentences.sampling import RepetitionGuard

    sampling = SamplingConfig(repetition_penalty=1.3, no_repeat_ngram_size=3, no_repeat_sentence=True)
    guard = RepetitionGuard(sampling, [[5, 6, 7], [8, 5]], eos_id=2)  # the answer so far: 5 6 7 8 5
    guard.push(6)  # this sentence so far: 6, after "... 8 5": the 3-gram "5 6 ->" was followed by 7
    assert guard.banned() == [7] and guard.penalized() == [5, 6, 7, 8]
    logits = np.random.default_rng(0).standard_normal((1, 12)).astype(np.float32) * 4
    ours = control_repetition(logits, [guard])
    theirs = torch_control_repetition(torch.as_tensor(logits), [guard]).numpy()
    assert np.array_equal(ours, theirs)
    for t in (5, 6, 8):
        expected = logits[0, t] / np.float32(1.3) if logits[0, t] > 0 else logits[0, t] * np.float32(1.3)
        assert ours[0, t] == expected
    assert ours[0, 7] == -np.inf and np.array_equal(ours[0, 9:], logits[0, 9:])
    again = RepetitionGuard(sampling, [[5, 6, 7], [9]], eos_id=2)
    again.push(9)
    assert 2 in again.banned()  # "9" + eos would repeat the sentence "9"
    again.push(4)
    assert 2 not in again.banned()


# ---------------------------------------------------------------- the sentence loop's rules

class _ScriptedRuntime:
    """An edge runtime whose decoder says the scripted sentences in turn ([] = eos at once); it
    records the answer each decode was given (the repetition controls' context)."""

    def __init__(self, sentences: list[list[int]]):
        self.sentences = list(sentences)
        self.answers = []

    def encode(self, ids: list[list[int]]) -> np.ndarray:
        return np.zeros((len(ids), 2), np.float32)

    def decode(self, hidden, sampling, max_tokens=None, **kw) -> Decoded:
        self.answers.append([list(s) for s in kw.get("answer", [])])
        ids = self.sentences.pop(0) if self.sentences else [7]
        return Decoded(ids, f"<{len(ids)}>", 1.0)


class _ScriptedStepper:
    """A cloud whose termination head says the scripted stop flags (or P(stop)s) in turn; counts
    what is appended."""

    def __init__(self, stops: list[bool], p_stop: list[float] | None = None):
        self.stops, self.p_stop, self.appended = list(stops), list(p_stop or []), []

    def append(self, vectors: np.ndarray) -> StepResult:
        self.appended.append(len(vectors))
        p = self.p_stop.pop(0) if self.p_stop else 0.5
        return StepResult(np.zeros(2, np.float32), self.stops.pop(0) if self.stops else False, p, 0)


@pytest.mark.parametrize("sentences, stops, options, reason, n, appended", [
    ([[5], [6]], [False, False, True], {}, "stop", 2, [2, 1, 1]),
    ([[5], []], [], {}, "empty", 1, [2, 1]),
    ([], [], {"max_sentences": 2}, "max_sentences", 2, [2, 1, 1]),
    ([], [], {"room": 2}, "context_full", 2, [2, 1, 1]),
    ([], [], {"interrupted": lambda: True}, "interrupted", 0, [2]),
])
def test_sentence_loop_stop_rules_and_caps(sentences, stops, options, reason, n, appended):
    stepper = _ScriptedStepper(stops)
    options = {"room": 5, "max_sentences": 8, **options}
    events = list(sentence_loop(_ScriptedRuntime(sentences), stepper, [[3], [4]], Sampling(), context_used=10,
                                turn=3, **options))
    *said, end = events
    assert [ev.index for ev in said] == list(range(n)) and all(ev.turn == 3 for ev in said)
    assert (end.reason, end.sentences, end.prompt_sentences) == (reason, n, 2)
    assert stepper.appended == appended and end.context_sentences == 10 + sum(appended)
    assert end.edge_decode_ms == (1.0 if reason == "empty" else 0.0)  # the empty decode, timed


def test_sentence_loop_appends_a_sentence_only_when_asked_for_the_next_event():
    """A consumer that stops reading right after a sentence leaves it out of the context; one that
    asks to be interrupted gets it appended first."""
    stepper = _ScriptedStepper([])
    events = sentence_loop(_ScriptedRuntime([]), stepper, [[3]], Sampling(), room=5)
    assert next(events).index == 0 and stepper.appended == [1]
    events.close()
    assert stepper.appended == [1]
    stop = []
    events = sentence_loop(_ScriptedRuntime([]), stepper, [[3]], Sampling(), room=5, interrupted=lambda: bool(stop))
    next(events)
    stop.append(1)
    end = next(events)
    assert end.reason == "interrupted" and end.sentences == 1 and stepper.appended == [1, 1, 1]


@pytest.mark.parametrize("p_stop, threshold, reason, n", [
    ([0.9, 0.1, 0.35, 0.9], 0.3, "stop", 2),  # never before the first sentence; then P(stop) >= 0.3
    ([0.9, 0.1, 0.29, 0.9], 0.3, "stop", 3),
    ([0.9, 0.9, 0.9, 0.9], 1.0, "max_sentences", 4),
    ([0.0, 0.0, 0.0, 0.0], 0.0, "stop", 1),  # 0: one sentence, then stop
])
def test_sentence_loop_stops_on_the_threshold_from_the_second_sentence(p_stop, threshold, reason, n):
    stepper = _ScriptedStepper([True] * 9, p_stop + [0.0] * 4)  # the argmax flags say stop: ignored
    events = list(sentence_loop(_ScriptedRuntime([]), stepper, [[3]], Sampling(), room=9, max_sentences=4,
                                stop_threshold=threshold))
    assert (events[-1].reason, events[-1].sentences) == (reason, n)
    assert [e.stop_probability for e in events[:-1]] == p_stop[:n]


def test_sentence_loop_hands_the_answer_to_the_decoder_and_ends_on_a_repeat():
    """With a repetition control on, each decode sees the answer so far; with the sentence guard on,
    a sentence that still repeats an earlier one (the guard lost at the token limit) ends the answer."""
    rt = _ScriptedRuntime([[5, 6], [8], [5, 6], [9]])
    events = list(sentence_loop(rt, _ScriptedStepper([]), [[3]], Sampling(no_repeat_sentence=True), room=9))
    assert [e.ids for e in events[:-1]] == [[5, 6], [8]] and events[-1].reason == "repeat"
    assert rt.answers == [[], [[5, 6]], [[5, 6], [8]]]
    rt = _ScriptedRuntime([[5, 6], [5, 6]])
    events = list(sentence_loop(rt, _ScriptedStepper([]), [[3]], Sampling(), room=9, max_sentences=2))
    assert events[-1].reason == "max_sentences" and rt.answers == [[], []]  # no control: nothing handed over


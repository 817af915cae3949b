"""`edge-chat`: chat with an SLLM split between this machine (ONNX Runtime) and a cloud server.

    edge-chat --local                                  # start a server for models/default here, chat
    edge-chat --local --model runs/export              # DIR holding edge/ and cloud/
    edge-chat --local --model org/sllm-small@v1        # a model-hub id, fetched into huggingface_hub's cache
    edge-chat --server gpu-box:50051 --token T --bundle models/default/edge
    edge-chat --local --prompt "It is a truth universally acknowledged,"     # one turn, then exit
    printf 'First turn.\\nSecond turn.\\n' | edge-chat --local --json          # one turn per line
    edge-chat serve --local                            # the OpenAI HTTP API + a chat page on 127.0.0.1:8000

Interactive (stdin is a terminal): a REPL that prints each sentence as soon as it is decoded
and keeps one cloud session across turns; /reset, /quit, /help. Ctrl-C stops the current
answer after the sentence being decoded (the session stays); a second Ctrl-C aborts at once
(the session is rebuilt from history on the next turn); at the prompt Ctrl-C clears the line,
Ctrl-D or /quit leaves. Piped stdin: every non-empty line is one turn of one conversation
(lines starting with / are the same commands); text mode prints one line per turn.
--json prints JSON lines: a "ready" line (model, devices, context, speculation asked and granted),
a "sentence" line per sentence (with its edge encode, cloud step and edge decode milliseconds) and
a "turn_end" line per turn.
Failures print `error: ...` and exit with code 2 (130 after Ctrl-C twice outside the REPL).
"""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer

from sllm.edge.api import REMOTE_SPECULATE, AnswerOptions, EdgeChat, check_wire_dtype, connect, load_runtime
from sllm.edge.cli_options import answer_options
from sllm.edge.failures import EdgeError, TurnError
from sllm.edge.loop import SentenceEvent, TurnEnd
from sllm.edge.remote import DEFAULT_STEP_TIMEOUT_S
from sllm.protos.client import DEFAULT_KEEPALIVE_S
from sllm.runtime.console import APP_SETTINGS, Terminal
from sllm.runtime.models import ModelError, default_model, no_default_model_message, resolve_model
from sllm.runtime.server_process import TOKEN_ENV

app = typer.Typer(**APP_SETTINGS, pretty_exceptions_enable=False,
                  help="Chat with a sentence-level LM: SentenceVAE on this machine (ONNX Runtime), "
                       "OPT blocks on a cloud server (gRPC).")

HELP = """commands:
  /reset   forget the conversation (a new cloud session)
  /quit    leave (also /exit, Ctrl-D)
  /help    this text
Ctrl-C stops the current answer (the conversation goes on); twice aborts it at once."""


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


TERMINAL = Terminal()  # the answer's text on stdout, notices on stderr: each notice on a line of its own


def _note(message: str) -> None:
    TERMINAL.notice(f"edge-chat: {message}", fg=typer.colors.YELLOW)


class _Interrupts:
    """SIGINT while an answer runs: the first calls `stop` (the answer ends after the sentence
    being decoded), the second raises KeyboardInterrupt. Outside the main thread (no signals
    there) it does nothing."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self.stop = stop
        self.count = 0
        self._prev = None

    def __enter__(self) -> "_Interrupts":
        try:
            self._prev = signal.signal(signal.SIGINT, self._handler)
        except ValueError:
            self._prev = None
        return self

    def _handler(self, signum, frame) -> None:
        self.count += 1
        if self.count >= 2:
            raise KeyboardInterrupt
        self.stop()

    def __exit__(self, *exc) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)


class _Output:
    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.open_line = False  # text mode: an answer line is being written

    def emit(self, obj: dict) -> None:
        TERMINAL.out(json.dumps(obj, ensure_ascii=False) + "\n")

    def sentence(self, ev: SentenceEvent) -> None:
        if self.as_json:
            self.emit({"event": "sentence", "turn": ev.turn, "index": ev.index, "text": ev.text,
                       "tokens": len(ev.ids), "stop_probability": round(ev.stop_probability, 6),
                       "edge_encode_ms": round(ev.edge_encode_ms, 3), "cloud_step_ms": round(ev.cloud_step_ms, 3),
                       "edge_decode_ms": round(ev.edge_decode_ms, 3)})
            return
        TERMINAL.out(ev.text)
        self.open_line = True

    def turn_end(self, ev: TurnEnd) -> None:
        if self.as_json:
            self.emit({"event": "turn_end", "turn": ev.turn, "reason": ev.reason, "sentences": ev.sentences,
                       "prompt_sentences": ev.prompt_sentences, "context_sentences": ev.context_sentences,
                       "stop_probability": round(ev.stop_probability, 6),
                       "edge_encode_ms": round(ev.edge_encode_ms, 3), "cloud_step_ms": round(ev.cloud_step_ms, 3),
                       "edge_decode_ms": round(ev.edge_decode_ms, 3), "total_ms": round(ev.total_ms, 3)})
        else:
            self.end_line()
        if ev.reason == "interrupted":
            _note(f"stopped after {ev.sentences} sentence(s); the conversation goes on")

    def end_line(self) -> None:
        if not self.as_json:
            TERMINAL.out("\n")
        self.open_line = False


PROMPT_TICK_S = 0.1


def _prompt_input(prompt: str) -> str:
    """input(prompt), where a Ctrl-C is acted on whenever it lands. CPython's readline prompt looks
    at signals only when the select() it waits in is interrupted: a Ctrl-C that arrives between the
    prompt being written and that select() (microseconds, more on a loaded machine; one in a few
    hundred when ^C is pressed as the prompt appears) stays pending until the next key, and then
    swallows the line typed. A no-op SIGALRM every PROMPT_TICK_S interrupts the select(), so a
    pending Ctrl-C clears the line within that time."""
    try:
        previous = signal.signal(signal.SIGALRM, lambda *_: None)
    except (AttributeError, ValueError):  # no SIGALRM (Windows), or not the main thread
        return input(prompt)
    signal.setitimer(signal.ITIMER_REAL, PROMPT_TICK_S, PROMPT_TICK_S)
    try:
        return input(prompt)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _terminal_lines() -> Iterator[str]:
    """Lines typed at the "> " prompt until Ctrl-D; Ctrl-C at the prompt only clears the line."""
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    while True:
        try:
            yield _prompt_input("> ")
        except EOFError:
            typer.echo("", err=True)
            return
        except KeyboardInterrupt:
            typer.echo("", err=True)  # a fresh line


def _piped_lines(stream) -> Iterator[str]:
    for line in iter(stream.readline, ""):
        yield line.rstrip("\r\n")


class _Chat:
    def __init__(self, chat: EdgeChat, out: _Output):
        self.chat, self.out = chat, out

    def turn(self, text: str) -> None:
        """One turn; EdgeError/TurnError/KeyboardInterrupt propagate (after the answer line is closed)."""
        try:
            answer = self.chat.ask(text)
            with _Interrupts(answer.stop):
                for sentence in answer:
                    self.out.sentence(sentence)
                self.out.turn_end(answer.end)
        except BaseException:
            if self.out.open_line:
                self.out.end_line()
            raise

    def command(self, line: str) -> bool:
        """A /command; False means leave."""
        cmd = line.split()[0].lower()
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/reset":
            self.chat.reset()
            _note("new conversation")
        elif cmd == "/help":
            typer.echo(HELP, err=True)
        else:
            _note(f"unknown command {cmd}; /help lists them")
        return True

    def run(self, lines: Iterator[str], keep_going: bool) -> None:
        """Every non-empty line is one turn, or a /command. keep_going (the REPL): a failed or
        aborted turn is reported and the next line is read; else the failure ends the chat."""
        for line in lines:
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return
                continue
            if not keep_going:
                self.turn(line)
                continue
            try:
                self.turn(line)
            except TurnError as e:
                typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            except EdgeError as e:
                typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
                _note(f"the conversation ({self.chat.context_sentences} sentences) is kept; the next turn tries again")
            except KeyboardInterrupt:
                _note("answer aborted; the session will be rebuilt from the history on the next turn")


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: the local server is stopped


@app.command()
@answer_options(_fail)
def chat(
    mode: Optional[str] = typer.Argument(None, metavar="serve", show_default=False,
                                         help="serve: instead of a chat, the OpenAI-compatible HTTP API and a chat "
                                              "page on --host:--port (docs/edge-api.md)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="one turn, print the answer, exit"),
    server: str = typer.Option("127.0.0.1:50051", "--server", envvar="SLLM_CLOUD_SERVER",
                               help="cloud server host:port"),
    token: Optional[str] = typer.Option(None, "--token", envvar=TOKEN_ENV, show_envvar=True,
                                        help="bearer token for the cloud server"),
    tls_ca: Optional[Path] = typer.Option(None, "--tls-ca", help="CA / self-signed certificate to trust (TLS)"),
    tls: bool = typer.Option(False, "--tls", help="TLS with the system's trusted roots"),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="this client's certificate (PEM; with "
                                                                      "--tls-key): for a server that requires one"),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="the private key of --tls-cert (PEM)"),
    server_name: Optional[str] = typer.Option(None, help="TLS name to check in the server's certificate"),
    step_timeout: float = typer.Option(DEFAULT_STEP_TIMEOUT_S, min=0, help="seconds a cloud step may take before "
                                                                           "the turn fails; 0 = no limit"),
    keepalive: float = typer.Option(DEFAULT_KEEPALIVE_S, min=0, help="seconds between keepalive pings to the server "
                                                                     "while a chat is open; 0 = none"),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="edge bundle (default: MODEL/edge)"),
    local: bool = typer.Option(False, "--local", help="start a cloud server for MODEL/cloud on 127.0.0.1 "
                                                       "for this chat, stop it on exit"),
    model: Optional[str] = typer.Option(None, "--model", help="a folder holding edge/ and cloud/ (sllm-export "
                                        "--out DIR), or a model-hub id ORG/NAME[@REVISION]; default: models/default "
                                        "here or in the source checkout"),
    local_timeout: float = typer.Option(120.0, help="--local: seconds to wait for the server to be healthy"),
    options: AnswerOptions = None,  # --temperature ... --stop-threshold: one option per field (edge.cli_options)
    as_json: bool = typer.Option(False, "--json", help="JSON lines with per-sentence timings"),
    device: str = typer.Option("auto", help="edge ONNX Runtime device: auto (CUDA when it really loads), "
                                             "cpu, cuda; --local: also the server's"),
    threads: int = typer.Option(0, help="CPU threads for ONNX Runtime (and the --local server); 0 = default"),
    wire_dtype: str = typer.Option("float32", help="sentence vectors on the wire: float32 or float16"),
    speculate: Optional[int] = typer.Option(None, min=0, help="sentence-level speculation: sentences the cloud may "
                                            "guess ahead, hiding the round trip per sentence (the edge checks every "
                                            f"guess); 0 = off; default: {REMOTE_SPECULATE} for a server on another "
                                            "machine, 0 on this one (--local, loopback)"),
    host: str = typer.Option("127.0.0.1", help="serve: the address to listen on"),
    port: int = typer.Option(8000, min=0, help="serve: the port (0: the OS picks)"),
    api_key: Optional[str] = typer.Option(None, envvar="SLLM_EDGE_API_KEY", show_envvar=True,
                                          help="serve: the key clients must send (Authorization: Bearer KEY)"),
    conversations: int = typer.Option(64, min=1, help="serve: conversations (cloud sessions) kept, least recently "
                                                      "used closed first"),
    max_request_bytes: int = typer.Option(1 << 20, min=1, help="serve: the largest request body taken"),
    max_answer_tokens: int = typer.Option(4096, min=1, help="serve: the largest max_tokens a request may ask"),
) -> None:
    """Chat with an SLLM: sentences are encoded and decoded here, the cloud predicts the next one."""
    try:
        code = _run(**locals())
    except EdgeError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo("", err=True)
        _fail("interrupted", 130)
    except BrokenPipeError:  # the reader of stdout went away (`| head`): leave quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback only on request
        if os.environ.get("SLLM_EDGE_DEBUG"):
            raise
        _fail(f"unexpected {type(e).__name__}: {e} (set SLLM_EDGE_DEBUG=1 for the traceback)", 1)
    raise typer.Exit(code)


def _run(prompt, server, token, tls_ca, tls, tls_cert, tls_key, server_name, step_timeout, keepalive, bundle, local,
         model, local_timeout, options: AnswerOptions, as_json, device, threads, wire_dtype, speculate=None,
         mode=None, **serving) -> int:
    TERMINAL.reset()
    check_wire_dtype(wire_dtype)
    if mode not in (None, "serve"):
        raise EdgeError(f"unknown command {mode!r}; the one command is `serve` (edge-chat --help)")
    if mode == "serve" and prompt is not None:
        raise EdgeError("--prompt is for a chat; `edge-chat serve` answers HTTP requests")
    if prompt is not None and not prompt.strip():
        raise EdgeError("--prompt is empty")

    model_dir = _model_folder(model, bundle, local)
    edge_dir = bundle if bundle is not None else model_dir / "edge"
    runtime = load_runtime(edge_dir, device, threads, notify=_note)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, _terminate)
        except (ValueError, AttributeError):  # not the main thread / not this platform
            pass

    local_server = None
    chat = None
    try:
        if local:
            local_server = _start_local(model_dir, runtime, local_timeout, threads, device)
            server, token = local_server.address, local_server.token
            # loopback, plaintext; the random token still guards it
            tls, tls_ca, tls_cert, tls_key, server_name = False, None, None, None, None
            _note(f"started a local cloud server (pid {local_server.pid}) at {server}")
        open_chat = functools.partial(connect, server, runtime, token=token, tls=tls, tls_ca=tls_ca,
                                      tls_cert=tls_cert, tls_key=tls_key, server_name=server_name,
                                      wire_dtype=wire_dtype, step_timeout=step_timeout, keepalive_s=keepalive,
                                      options=options, notify=_note, speculate=speculate)
        if mode == "serve":
            return _serve(open_chat, runtime, options, **serving)
        chat = open_chat()
        session, out = chat.session.stepper, _Output(as_json)  # the cloud session
        info = session.info
        if as_json:
            out.emit({"event": "ready", "model_id": runtime.model_id, "d": runtime.d_model,
                      "edge_provider": runtime.provider, "server": session.target, "cloud_device": info.device,
                      "cloud_dtype": info.compute_dtype, "context_sentences": chat.context_capacity,
                      "local_server_pid": local_server.pid if local_server else None,
                      "speculate_asked": session.speculate, "speculate": _granted(session)[0]})
        if prompt is not None:
            _Chat(chat, out).turn(prompt)
        elif sys.stdin.isatty():
            edge_dev = "CPU" if runtime.provider == "CPUExecutionProvider" else "CUDA"
            typer.echo(f"edge-chat · model {runtime.model_id} (d={runtime.d_model}) · edge: ONNX Runtime {edge_dev} "
                       f"· cloud: {session.target} ({info.device}, {info.compute_dtype}) · up to "
                       f"{options.max_sentences} sentences an answer · {_speculation_words(session)} · /help", err=True)
            _Chat(chat, out).run(_terminal_lines(), keep_going=True)
        else:
            _Chat(chat, out).run(_piped_lines(sys.stdin), keep_going=False)
        return 0
    finally:
        if chat is not None:
            chat.close()
        if local_server is not None:
            local_server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(open_chat, runtime, options: AnswerOptions, host: str, port: int, api_key: Optional[str],
           conversations: int, max_request_bytes: int, max_answer_tokens: int) -> int:
    """edge-chat serve: the cloud checked once (a wrong server fails here, in one line), then the HTTP API."""
    from sllm.edge.conversations import Conversations
    from sllm.edge.gateway import create_app, serve

    open_chat().close()
    app = create_app(Conversations(open_chat, conversations), runtime.model_id, defaults=options,
                     api_key=api_key, max_request_bytes=max_request_bytes, max_tokens=max_answer_tokens)
    on_loopback = host in ("127.0.0.1", "::1", "localhost")
    if not api_key and not on_loopback:
        _note(f"warning: serving on {host} without --api-key: anyone who reaches it can use the cloud")
    serve(app, host, port, ready=lambda address, stop: TERMINAL.out(json.dumps(
        {"event": "serving", "address": address, "url": f"http://{address}/", "model_id": runtime.model_id}) + "\n"))
    return 0


def _model_folder(model: Optional[str], bundle: Optional[Path], local: bool) -> Optional[Path]:
    """The --model folder (a hub id fetched into the cache), holding what this chat reads from it:
    edge/ unless --bundle names the edge bundle, cloud/ (and svae/, for speculation) with --local."""
    parts = ([] if bundle is not None else ["edge"]) + (["cloud"] if local else [])
    if not parts:
        return None
    if model is None:
        found = default_model()
        if found is None:
            raise EdgeError(no_default_model_message() + ("" if local else "; or --bundle DIR with --server HOST:PORT"))
        model = str(found)
    try:
        return resolve_model(model, parts, optional=["svae"] if local else [])
    except ModelError as e:
        raise EdgeError(str(e)) from None


def _granted(session) -> tuple[int, str]:
    """Sentences the cloud may run ahead of this conversation, and the server's note when it grants fewer."""
    conv = session.conv
    return (conv.speculate, conv.speculate_note) if conv is not None else (0, "")


def _speculation_words(session) -> str:
    granted, note = _granted(session)
    if granted:  # the cloud decodes its guesses with the edge's graphs: it reads this conversation's text
        return (f"speculation: {granted} sentences ahead (the cloud can read this conversation's text; "
                "--speculate 0 keeps it to vectors)")
    if session.speculate:
        return f"speculation: off ({note or 'not granted'})"
    return "speculation: off"


def _start_local(model_dir: Path, runtime, timeout: float, threads: int, device: str):
    from sllm.edge.local import LocalServer
    from sllm.runtime.manifest import CLOUD_WEIGHTS, BundleError, cloud_weights_sha256, read_manifest

    cloud_dir = model_dir / "cloud"
    try:  # the server checks the hashes itself
        cloud = read_manifest(cloud_dir, kind="cloud", verify=False, required=(CLOUD_WEIGHTS,))
    except BundleError as e:
        raise EdgeError(f"--local needs a cloud bundle in {model_dir}: {e}") from None
    problem = runtime.bundle.cloud_mismatch(cloud.get("model_id"), cloud.get("d_model"), cloud_weights_sha256(cloud),
                                            f"{cloud_dir} holds", "refusing to start")
    if problem is not None:  # before starting anything (connect checks the server's answer again)
        raise EdgeError(problem)
    return LocalServer(cloud_dir, startup_timeout=timeout, threads=threads,
                       device="cpu" if device == "cpu" else "auto").start()


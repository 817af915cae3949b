"""`edge-chat`: chat with an SLLM split between this machine (ONNX Runtime) and a cloud server.

    edge-chat --local                                  # start a server for models/default here, chat
    edge-chat --local --model runs/export              # DIR holding edge/ and cloud/
    edge-chat --server gpu-box:50051 --token T --bundle models/default/edge
    edge-chat --local --prompt "It is a truth universally acknowledged,"     # one turn, then exit
    printf 'First turn.\\nSecond turn.\\n' | edge-chat --local --json          # one turn per line

Interactive (stdin is a terminal): a REPL that prints each sentence as soon as it is decoded
and keeps one cloud session across turns; /reset, /quit, /help. Ctrl-C stops the current
answer after the sentence being decoded (the session stays); a second Ctrl-C aborts at once
(the session is rebuilt from history on the next turn); at the prompt Ctrl-C clears the line,
Ctrl-D or /quit leaves. Piped stdin: every non-empty line is one turn of one conversation
(lines starting with / are the same commands); text mode prints one line per turn.
--json prints JSON lines: a "ready" line, a "sentence" line per sentence (with its edge encode,
cloud step and edge decode milliseconds) and a "turn_end" line per turn.
Failures print `error: ...` and exit with code 2 (130 after Ctrl-C twice outside the REPL).
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from edge.chat import ChatSession, EdgeError, SentenceEvent, TurnEnd, TurnError
from edge.sampling import Sampling

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Chat with a sentence-level LM: SentenceVAE on this machine (ONNX Runtime), "
                       "OPT blocks on a cloud server (gRPC).")

DEFAULT_MODEL = Path("models/default")
TOKEN_ENV = "SLLM_CLOUD_TOKEN"
HELP = """commands:
  /reset   forget the conversation (a new cloud session)
  /quit    leave (also /exit, Ctrl-D)
  /help    this text
Ctrl-C stops the current answer (the conversation goes on); twice aborts it at once."""


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _note(message: str) -> None:
    typer.secho(f"edge-chat: {message}", fg=typer.colors.YELLOW, err=True)


def _resolve(path: Path) -> Path:
    """A relative default that is missing here may live in the source checkout (editable install)."""
    if path.is_absolute() or path.exists():
        return path
    beside = Path(__file__).resolve().parents[1] / path
    return beside if beside.exists() else path


class _Interrupts:
    """SIGINT while an answer runs: the first sets a flag (checked between sentences), the second
    raises KeyboardInterrupt. Outside the main thread (no signals there) it does nothing."""

    def __init__(self) -> None:
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

    def requested(self) -> bool:
        return self.count > 0

    def __exit__(self, *exc) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)


class _Output:
    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.open_line = False  # text mode: an answer line is being written

    def emit(self, obj: dict) -> None:
        sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def sentence(self, ev: SentenceEvent) -> None:
        if self.as_json:
            self.emit({"event": "sentence", "turn": ev.turn, "index": ev.index, "text": ev.text,
                       "tokens": len(ev.ids), "stop_probability": round(ev.stop_probability, 6),
                       "edge_encode_ms": round(ev.edge_encode_ms, 3), "cloud_step_ms": round(ev.cloud_step_ms, 3),
                       "edge_decode_ms": round(ev.edge_decode_ms, 3)})
            return
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        self.open_line = True

    def turn_end(self, ev: TurnEnd) -> None:
        if self.as_json:
            self.emit({"event": "turn_end", "turn": ev.turn, "reason": ev.reason, "sentences": ev.sentences,
                       "prompt_sentences": ev.prompt_sentences, "context_sentences": ev.context_sentences,
                       "stop_probability": round(ev.stop_probability, 6),
                       "edge_encode_ms": round(ev.edge_encode_ms, 3), "cloud_step_ms": round(ev.cloud_step_ms, 3),
                       "total_ms": round(ev.total_ms, 3)})
        else:
            self.end_line()
        if ev.reason == "interrupted":
            _note(f"stopped after {ev.sentences} sentence(s); the conversation goes on")

    def end_line(self) -> None:
        if not self.as_json:
            sys.stdout.write("\n")
            sys.stdout.flush()
        self.open_line = False


class _Chat:
    def __init__(self, session: ChatSession, out: _Output, sampling: Sampling, max_sentences: int,
                 max_tokens: int | None):
        self.session, self.out = session, out
        self.sampling, self.max_sentences, self.max_tokens = sampling, max_sentences, max_tokens

    def turn(self, text: str) -> None:
        """One turn; EdgeError/TurnError/KeyboardInterrupt propagate (after the answer line is closed)."""
        try:
            with _Interrupts() as interrupts:
                for ev in self.session.turn(text, self.sampling, self.max_sentences, self.max_tokens,
                                            interrupts.requested):
                    if isinstance(ev, SentenceEvent):
                        self.out.sentence(ev)
                    elif isinstance(ev, TurnEnd):
                        self.out.turn_end(ev)
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
            self.session.reset()
            _note("new conversation")
        elif cmd == "/help":
            typer.echo(HELP, err=True)
        else:
            _note(f"unknown command {cmd}; /help lists them")
        return True

    def repl(self) -> None:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        while True:
            try:
                line = input("> ")
            except EOFError:
                typer.echo("", err=True)
                return
            except KeyboardInterrupt:
                typer.echo("", err=True)  # Ctrl-C at the prompt: a fresh line
                continue
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return
                continue
            try:
                self.turn(line)
            except TurnError as e:
                typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            except EdgeError as e:
                typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
                _note(f"the conversation ({len(self.session.history)} sentences) is kept; the next turn tries again")
            except KeyboardInterrupt:
                _note("answer aborted; the session will be rebuilt from the history on the next turn")

    def piped(self, stream) -> None:
        """Every non-empty line is one turn; /commands as in the REPL."""
        while True:
            line = stream.readline()
            if not line:
                return
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return
                continue
            self.turn(line.rstrip("\r\n"))


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: the local server is stopped


@app.command()
def chat(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="one turn, print the answer, exit"),
    server: str = typer.Option("127.0.0.1:50051", "--server", envvar="SLLM_CLOUD_SERVER",
                               help="cloud server host:port"),
    token: Optional[str] = typer.Option(None, "--token", envvar=TOKEN_ENV, show_envvar=True,
                                        help="bearer token for the cloud server"),
    tls_ca: Optional[Path] = typer.Option(None, "--tls-ca", help="CA / self-signed certificate to trust (TLS)"),
    tls: bool = typer.Option(False, "--tls", help="TLS with the system's trusted roots"),
    server_name: Optional[str] = typer.Option(None, help="TLS name to check in the server's certificate"),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="edge bundle (default: MODEL/edge)"),
    local: bool = typer.Option(False, "--local", help="start a cloud server for MODEL/cloud on 127.0.0.1 "
                                                       "for this chat, stop it on exit"),
    model: Path = typer.Option(DEFAULT_MODEL, "--model", help="export folder holding edge/ and cloud/"),
    local_timeout: float = typer.Option(120.0, help="--local: seconds to wait for the server to be healthy"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_k: int = typer.Option(0, help="0 = off"),
    top_p: float = typer.Option(1.0, help="1 = off"),
    seed: Optional[int] = typer.Option(None, help="sentence i of a turn samples with seed + i"),
    max_sentences: int = typer.Option(8, help="sentences per answer at most (the context may allow fewer)"),
    max_sentence_tokens: int = typer.Option(0, help="tokens per sentence at most; 0 = the bundle's limit"),
    as_json: bool = typer.Option(False, "--json", help="JSON lines with per-sentence timings"),
    device: str = typer.Option("auto", help="edge ONNX Runtime device: auto (CUDA when it really loads), "
                                             "cpu, cuda; --local: also the server's"),
    threads: int = typer.Option(0, help="CPU threads for ONNX Runtime (and the --local server); 0 = default"),
    wire_dtype: str = typer.Option("float32", help="sentence vectors on the wire: float32 or float16"),
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


def _run(prompt, server, token, tls_ca, tls, server_name, bundle, local, model, local_timeout, temperature, top_k,
         top_p, seed, max_sentences, max_sentence_tokens, as_json, device, threads, wire_dtype) -> int:
    from edge.providers import ProviderError
    from edge.runtime import EdgeRuntime
    from export.manifest import BundleError

    try:
        sampling = Sampling(temperature, top_k, top_p, seed)
    except ValueError as e:
        raise EdgeError(str(e)) from None
    if max_sentences < 0:
        raise EdgeError(f"--max-sentences must be >= 0, got {max_sentences}")
    if max_sentence_tokens < 0:
        raise EdgeError(f"--max-sentence-tokens must be >= 0 (0 = the bundle's limit), got {max_sentence_tokens}")
    if wire_dtype not in ("float32", "float16"):
        raise EdgeError(f"--wire-dtype must be float32 or float16, got {wire_dtype!r}")
    if prompt is not None and not prompt.strip():
        raise EdgeError("--prompt is empty")

    model_dir = _resolve(model)
    edge_dir = bundle if bundle is not None else model_dir / "edge"
    if bundle is None and not edge_dir.exists():
        hint = ("export one there with `sllm-export CHECKPOINT --out models/default`, or pass --model / --bundle"
                if model == DEFAULT_MODEL else "pass --bundle or a --model folder holding edge/ and cloud/")
        raise EdgeError(f"no edge bundle at {edge_dir}: {hint}")
    try:
        runtime = EdgeRuntime.load(edge_dir, device=device, threads=threads)
    except (BundleError, ProviderError, ValueError) as e:
        raise EdgeError(str(e)) from None
    for warning in runtime.notes + ([runtime.device_note] if runtime.device_note else []):
        _note(f"warning: {warning}")

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, _terminate)
        except (ValueError, AttributeError):  # not the main thread / not this platform
            pass

    local_server = None
    session = None
    try:
        if local:
            local_server = _start_local(model_dir, runtime, local_timeout, threads, device)
            target, token, root_certs = local_server.address, local_server.token, None
            tls, server_name = False, None  # loopback, plaintext; the random token still guards it
            _note(f"started a local cloud server (pid {local_server.pid}) at {target}")
        else:
            target = server.strip()
            if not target or (":" not in target):
                raise EdgeError(f"--server must be host:port, got {server!r}")
            root_certs = None
            if tls_ca is not None:
                try:
                    root_certs = tls_ca.read_bytes()
                except OSError as e:
                    raise EdgeError(f"cannot read --tls-ca: {e}") from None

        from protos.client import CloudClient

        def client_factory() -> CloudClient:
            return CloudClient(target, token or None, tls=tls, root_certificates=root_certs,
                               server_name=server_name)

        session = ChatSession(runtime, client_factory, target, wire_dtype=wire_dtype, notify=_note)
        session.connect()
        out = _Output(as_json)
        chat = _Chat(session, out, sampling, max_sentences, max_sentence_tokens or None)
        interactive = prompt is None and sys.stdin.isatty()
        info = session.info
        if as_json:
            out.emit({"event": "ready", "model_id": runtime.model_id, "d": runtime.d_model,
                      "edge_provider": runtime.provider, "server": target, "cloud_device": info.device,
                      "cloud_dtype": info.compute_dtype, "context_sentences": session.room,
                      "local_server_pid": local_server.pid if local_server else None})
        if interactive:
            edge_dev = "CPU" if runtime.provider == "CPUExecutionProvider" else "CUDA"
            typer.echo(f"edge-chat · model {runtime.model_id} (d={runtime.d_model}) · edge: ONNX Runtime {edge_dev} "
                       f"· cloud: {target} ({info.device}, {info.compute_dtype}) · up to {max_sentences} "
                       f"sentences an answer · /help", err=True)
            chat.repl()
        elif prompt is not None:
            chat.turn(prompt)
        else:
            chat.piped(sys.stdin)
        return 0
    except TurnError as e:
        raise EdgeError(str(e)) from None
    finally:
        if session is not None:
            session.close()
        if local_server is not None:
            local_server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_local(model_dir: Path, runtime, timeout: float, threads: int, device: str):
    from edge.local import LocalServer
    from export.manifest import BundleError, read_manifest

    cloud_dir = model_dir / "cloud"
    try:
        cloud = read_manifest(cloud_dir, kind="cloud", verify=False)  # the server checks the hashes itself
    except BundleError as e:
        raise EdgeError(f"--local needs a cloud bundle in {model_dir}: {e}") from None
    if cloud.get("model_id") != runtime.model_id or cloud.get("d_model") != runtime.d_model:
        raise EdgeError(
            f"the edge bundle and the cloud model are not halves of the same model: {runtime.path} holds "
            f"{runtime.model_id} (d={runtime.d_model}), {cloud_dir} holds {cloud.get('model_id')} "
            f"(d={cloud.get('d_model')}); refusing to start. Use the edge/ and cloud/ of one export.")
    return LocalServer(cloud_dir, startup_timeout=timeout, threads=threads,
                       device="cpu" if device == "cpu" else "auto").start()


def main() -> None:
    app()


if __name__ == "__main__":
    main()

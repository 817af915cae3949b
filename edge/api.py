"""Edge chat from Python: the conversation `edge-chat` holds, for apps that embed the client.

    from sllm import edge

    with edge.connect("127.0.0.1:50051", "models/default/edge", token=TOKEN) as chat:
        for sentence in chat.ask("It is a truth universally acknowledged,"):
            print(sentence.text, end="", flush=True)       # as soon as it is decoded
        print(chat.ask("Go on.", temperature=0.8, seed=1).text())

Every failure is an `EdgeError` whose message can be shown as it is; a `TurnError` (a subclass)
is a turn that cannot run (empty prompt, full context, a bad option) and leaves the conversation
as it was. After an EdgeError from the server (it went away), the next `ask` rebuilds the cloud
session from the sentence vectors the edge keeps. One conversation is not thread-safe.

This is the same ChatSession (runtime + remote stepper + sentence loop) as `edge-chat` (which is built
on this module). `AnswerOptions` (sllm.sentences.sampling) are the options of an answer, one field per
edge-chat option.
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from sllm.edge.chat import ChatSession
from sllm.edge.failures import EdgeError, TurnError
from sllm.edge.loop import SentenceEvent, TurnEnd
from sllm.edge.remote import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_STEP_TIMEOUT_S, RemoteStepper
from sllm.edge.runtime import EdgeRuntime
from sllm.protos.client import DEFAULT_KEEPALIVE_S, CloudClient, make_channel
from sllm.sentences.sampling import AnswerOptions

WIRE_DTYPES = ("float32", "float16")
# sentence-level speculation asked of a server on another machine; none of one on this machine, where
# there is no round trip to hide and the cloud's guessing only takes CPU from the edge. 16 rather than 4:
# the edge sends its stop rule and cap, so the cloud never guesses past the answer, and running further
# ahead was as fast or faster at every RTT (docs/results/rtt-chat.md)
REMOTE_SPECULATE = 16
_log = logging.getLogger("edge")


class Answer:
    """One answer, decoded as it is read: iterate for its sentences (SentenceEvent: .text, .ids,
    timings); `end` (a TurnEnd: reason, context size, timings) is set once it has ended.

    `stop()` ends it after the sentence being decoded (that sentence stays in the context).
    Leaving it unread (break, close(), or the next `ask`) ends it where it stands: the sentence
    read last is then not in the context."""

    def __init__(self, session: ChatSession, text: str, options: AnswerOptions):
        self.sentences: list[SentenceEvent] = []
        self.end: TurnEnd | None = None
        self._stop = False
        self._events = session.turn(text, options, interrupted=lambda: self._stop)

    def __iter__(self) -> Iterator[SentenceEvent]:
        return self

    def __next__(self) -> SentenceEvent:
        event = next(self._events)
        if isinstance(event, TurnEnd):
            self.end = event
            self._events.close()
            raise StopIteration
        self.sentences.append(event)
        return event

    def text(self) -> str:
        """Run the answer to its end; all its sentences joined."""
        for _ in self:
            pass
        return "".join(s.text for s in self.sentences)

    def stop(self) -> None:
        self._stop = True

    def close(self) -> None:
        self._events.close()


class EdgeChat:
    """One conversation with a cloud server; `connect` opens one."""

    def __init__(self, session: ChatSession, options: AnswerOptions = AnswerOptions()):
        self.session = session
        self.runtime: EdgeRuntime = session.runtime
        self.model_id: str = session.runtime.model_id
        self.options = options  # the defaults of every `ask`
        self._answer: Answer | None = None
        self._closed = False

    @property
    def context_sentences(self) -> int:
        """Sentences the conversation holds (prompts and answers, all turns)."""
        return len(self.session.stepper.history)

    @property
    def context_capacity(self) -> int:
        """Sentences the server's context has room for, all turns together."""
        return self.session.stepper.room

    def ask(self, text: str, **options) -> Answer:
        """Start a turn; TurnError now if it cannot run. `options`: any AnswerOptions field, for this
        turn only. The previous answer, if still being read, ends where it stands."""
        if self._closed:
            raise EdgeError("this conversation is closed")
        if self._answer is not None:
            self._answer.close()
        try:
            chosen = replace(self.options, **options) if options else self.options
        except (TypeError, ValueError) as e:  # an unknown or out-of-range option
            raise TurnError(str(e)) from None
        self._answer = Answer(self.session, text, chosen)
        return self._answer

    def reset(self) -> None:
        """Forget the conversation and start a new one (a new cloud session)."""
        if self._answer is not None:
            self._answer.close()
        self.session.reset()

    def close(self) -> None:
        if self._answer is not None:
            self._answer.close()
        self._closed = True
        self.session.close()

    def __enter__(self) -> "EdgeChat":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(server: str, bundle: str | Path | EdgeRuntime, *, token: str | None = None, tls: bool = False,
            tls_ca: str | Path | None = None, tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
            server_name: str | None = None, wire_dtype: str = "float32",
            connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S, step_timeout: float | None = DEFAULT_STEP_TIMEOUT_S,
            keepalive_s: float | None = DEFAULT_KEEPALIVE_S, device: str = "auto", threads: int = 0,
            options: AnswerOptions = AnswerOptions(), notify: Callable[[str], None] = _log.warning,
            speculate: int | None = None) -> EdgeChat:
    """Open a conversation: load the edge bundle (a bundle folder, a folder holding edge/, a model-hub id
    ORG/NAME[@REVISION]: see load_runtime; or take a loaded EdgeRuntime), check that the
    server at `server` (host:port) serves the other half of the same model (model id, d and the
    sha256 of its weights), open a session.

    tls_ca: a CA / self-signed certificate file to trust (implies TLS); tls: TLS with the system's
    roots; tls_cert + tls_key: this client's certificate and key (PEM files; implies TLS), for a
    server that requires client certificates (mutual TLS); server_name: the name to check in the
    server's certificate. connect_timeout: seconds for the server's model info (at connect and at
    every rebuild); step_timeout: seconds each cloud step may take (0 or None: no limit);
    keepalive_s: seconds between keepalive pings while the conversation is open (0 or None: none).
    notify: what to say about warnings and sessions rebuilt or resumed after a lost stream (default: the
    "edge" logger). speculate: sentences the cloud may run ahead of this edge (sentence-level speculation,
    edge.speculate: hides the round trip per sentence; 0 = off; a server without it grants 0); None:
    default_speculate(server)."""
    check_wire_dtype(wire_dtype)
    target = server.strip()
    if ":" not in target:
        raise EdgeError(f"the server address must be host:port, got {server!r}")
    _check_seconds(connect_timeout=(connect_timeout, False), step_timeout=(step_timeout, True),
                   keepalive_s=(keepalive_s, True))
    if (tls_cert is None) != (tls_key is None):
        raise EdgeError("a TLS client certificate needs both files: tls_cert and tls_key (--tls-cert, --tls-key)")
    root_certificates = _read_pem(tls_ca, "the TLS CA certificate")
    certificate_chain = _read_pem(tls_cert, "the TLS client certificate")
    private_key = _read_pem(tls_key, "the TLS client key")
    runtime = bundle if isinstance(bundle, EdgeRuntime) else load_runtime(bundle, device, threads, notify)

    def client_factory() -> CloudClient:
        # a channel of its own subchannels: a rebuild after a lost server then really dials again,
        # instead of inheriting the shared subchannel's back-off from the failure that lost it
        channel = make_channel(target, tls=tls, root_certificates=root_certificates, private_key=private_key,
                               certificate_chain=certificate_chain, server_name=server_name,
                               keepalive_s=keepalive_s or 0, options=(("grpc.use_local_subchannel_pool", 1),))
        return CloudClient(target, token or None, channel=channel)

    if speculate is None:
        speculate = default_speculate(target)
    if isinstance(speculate, bool) or not isinstance(speculate, int) or speculate < 0:
        raise EdgeError(f"speculate must be an integer >= 0 (0 = off), got {speculate!r}")
    stepper = RemoteStepper(runtime.bundle, client_factory, target, wire_dtype=wire_dtype,
                            connect_timeout=connect_timeout, step_timeout=step_timeout or None, notify=notify,
                            speculate=speculate, tls=bool(tls or root_certificates or certificate_chain))
    session = ChatSession(runtime, stepper)
    try:
        session.connect()
    except BaseException:
        session.close()
        raise
    return EdgeChat(session, options)


def default_speculate(target: str) -> int:
    """REMOTE_SPECULATE for a server on another machine; 0 for one on this machine (a loopback address,
    localhost or a unix socket)."""
    return 0 if on_this_machine(target) else REMOTE_SPECULATE


def on_this_machine(target: str) -> bool:
    """Whether a gRPC target (host:port, [v6]:port, dns:///host:port, ipv4:/ipv6:..., unix:path) is
    this machine. A name other than localhost counts as another machine (no DNS lookup here)."""
    target = target.strip()
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme):].split(",")[0]  # ipv4:/ipv6: may list several: the first decides
            break
    host = target.rsplit(":", 1)[0].strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_seconds(**values: tuple[float, bool]) -> None:
    """Each value a number of seconds > 0 (>= 0, or None, where zero is allowed: no limit)."""
    for name, (value, zero_ok) in values.items():
        if zero_ok and value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not (value > 0 or (zero_ok and value == 0)):
            raise EdgeError(f"{name} must be a number of seconds {'>= 0' if zero_ok else '> 0'}, got {value!r}")


def _read_pem(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise EdgeError(f"cannot read {what}: {e}") from None


def load_runtime(bundle: str | Path, device: str = "auto", threads: int = 0,
                 notify: Callable[[str], None] = _log.warning) -> EdgeRuntime:
    """The edge bundle, verified and loaded; EdgeError when it is missing, corrupt or cannot run.
    `bundle`: an edge bundle folder, a folder holding edge/ (an export), or a model-hub id
    ORG/NAME[@REVISION] whose repo holds edge/ (runtime.models: fetched into the hub's cache)."""
    from sllm.runtime.manifest import BundleError
    from sllm.runtime.models import ModelError, edge_bundle_folder
    from sllm.runtime.providers import ProviderError

    try:
        runtime = EdgeRuntime.load(edge_bundle_folder(bundle), device=device, threads=threads)
    except (BundleError, ProviderError, ModelError, ValueError) as e:
        raise EdgeError(str(e)) from None
    for warning in runtime.notes + ([runtime.device_note] if runtime.device_note else []):
        notify(f"warning: {warning}")
    return runtime


def check_wire_dtype(wire_dtype: str) -> None:
    if wire_dtype not in WIRE_DTYPES:
        raise EdgeError(f"wire_dtype must be float32 or float16, got {wire_dtype!r}")

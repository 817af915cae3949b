"""One conversation between the edge runtime and the cloud service.

The edge keeps every sentence vector the cloud has acknowledged (the history). A turn is the
shared sentence loop (`sllm.edge.loop.sentence_loop`) with this session as its stepper: at most
`max_sentences` sentences, never more than the context holds (the session's room minus what it
already holds, prompt included), and the last generated sentence is appended too, so the next
turn (or a rebuild) sees the whole conversation.

Every call of the conversation carries its routing key (`session_key`, metadata
protos.client.SESSION_KEY_HEADER): random, picked before the first Open, kept across reconnects
and rebuilds, new after reset(), and new when the replica it leads to refuses an Open because it
is shutting down (a balancer that has not taken a draining replica out yet). A balancer in front of
several replicas hashes on it (docs/deploy/README.md), so the conversation's calls go to the
replica that holds its session.

When the stream breaks (a replica killed, drained or restarted, a balancer restarted, an idle
timeout, the network, a keepalive ping not answered) the append reconnects on a fresh channel and
sends `Open{session_id, history}`: the server that still holds the session (kept by
keep_on_disconnect) resumes it, any other rebuilds it from the history vectors; `notify` is told
once either way, and the step is sent again. Bounded: `attempts` tries to reach a session, with a
doubling wait between them; one step goes to at most STEP_TRIES sessions. A step that does not come
back within `step_timeout` is an EdgeError at once (the server is overloaded, stopped or
unreachable: retrying now would wait as long again); the stream is dropped and the next turn
rebuilds the session under a new id (its state on the server is unknown).

Before any session the server must serve the other half of this edge bundle: the same model id
and d, and weights whose sha256 is the one the edge bundle recorded at export
(`sllm.runtime.edge_bundle.EdgeBundle.cloud_mismatch`); checked again at every reconnect.
"""
from __future__ import annotations

import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import grpc
import numpy as np

from sllm.edge.loop import MIN_ANSWER_SENTENCES, SentenceEvent, TurnEnd, sentence_loop
from sllm.edge.runtime import EdgeRuntime, PromptError
from sllm.edge.sampling import Sampling
from sllm.edge.speculate import TOLERANCE, SpeculativeStepper, turn_decoding
from sllm.protos.client import BALANCER_UNAVAILABLE, CloudClient, CloudError, Conversation, StepResult

DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_STEP_TIMEOUT_S = 30.0  # one round trip on the stream: a step, or a session rebuilt from history
DEFAULT_ATTEMPTS = 6  # tries to reach a session again (or to open one), waits of 0.1, 0.2, 0.4, 0.8, 1.6 s between
DEFAULT_BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0
STEP_TRIES = 3  # one step: sent on at most this many sessions (a replica dies, its successor dies too ...)
# a broken stream worth reopening from the history (the server lost or dropped the session)
_REBUILDABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.ABORTED, grpc.StatusCode.UNKNOWN}
# a failure to reach a server or open a session that may pass (a replica restarting or draining, a
# balancer between two configs); not a deadline: waiting as long again would not help
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED,
              grpc.StatusCode.UNKNOWN}


class EdgeError(Exception):
    """A failure to explain to the user in one message (no traceback)."""


class TurnError(EdgeError):
    """This turn cannot run (the conversation is full, the prompt is empty); the session is intact."""


def explain(e: CloudError, target: str, timeout: float | None = None, tls: bool = False) -> str:
    """A CloudError in words: what happened and what to do (tls: the channel uses TLS)."""
    code, details = e.code, e.details or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        if BALANCER_UNAVAILABLE in details:
            return (f"the load balancer at {target} has no cloud replica to send to ({details}): every replica "
                    "behind it is down or draining")
        if "shutting down" in details:
            return f"the cloud server at {target} is shutting down ({details})"
        if "too many pings" in details.lower():
            return (f"the cloud server at {target} closed the connection: it takes keepalive pings less often "
                    f"than this edge sends them ({details}); pass a longer keepalive (--keepalive, keepalive_s=) "
                    "or 0 for none")
        hint = ("; with TLS, also check the CA (--tls-ca), the name (--server-name) and, for a server that "
                "requires client certificates, --tls-cert/--tls-key") if tls else ""
        return (f"cannot reach the cloud server at {target} ({details or 'unavailable'}); is it running? "
                f"(`sllm-cloud serve --bundle DIR/cloud`, or `edge-chat --local` to start one here){hint}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (f"the cloud server at {target} refused the bearer token ({details}); pass the right one with "
                "--token or $SLLM_CLOUD_TOKEN")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        if timeout is None:  # a step: the details say which deadline
            return (f"no answer from the cloud server at {target}: {details} (it is overloaded, stopped or "
                    "unreachable; --step-timeout / step_timeout= sets the deadline)")
        return f"no answer from the cloud server at {target} within {timeout:g} s ({details})"
    if code == grpc.StatusCode.FAILED_PRECONDITION and ("mismatch" in details):
        return f"the edge bundle and the cloud model are not halves of the same model: {details}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"the cloud server at {target} is out of room: {details} (/reset starts a new conversation)"
    return f"the cloud server at {target} answered {code.name}: {details}"


def _why(e: CloudError) -> str:
    why = f"{e.code.name}: {e.details}" if e.details else e.code.name
    return f"{why}: the replica behind the balancer went away" if _reset_by_proxy(e) else why


def _reset_by_proxy(e: CloudError) -> bool:
    """A stream a proxy reset (nginx when the replica behind it died mid-stream): INTERNAL, RST_STREAM."""
    return e.code == grpc.StatusCode.INTERNAL and "RST_STREAM" in (e.details or "")


def _retryable(e: CloudError) -> bool:
    return e.code in _RETRYABLE or _reset_by_proxy(e)


def _mismatch(e: CloudError) -> bool:
    return "mismatch" in (e.details or "")


def new_session_key() -> str:
    """A conversation's routing key (protos.client.SESSION_KEY_HEADER): random, chosen by the edge before
    its first Open, so a balancer hashing on it sends every call of the conversation, the first
    included, to one replica. Not the session id (which it never reveals), nor derived from the token."""
    return secrets.token_hex(16)


class _Attempt(Exception):
    """A try that failed in a way worth another try (at_once: without waiting)."""

    def __init__(self, error: CloudError, message: str, at_once: bool = False):
        super().__init__(message)
        self.error, self.message, self.at_once = error, message, at_once


def rebuildable(e: CloudError) -> bool:
    """Did the server lose or drop the session (worth reopening it from the history)?"""
    if e.code in _REBUILDABLE or _reset_by_proxy(e):
        return True
    # the server frees a session idle longer than its timeout and ends its stream so
    return e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "idle" in (e.details or "")


def answer(runtime: EdgeRuntime, stepper, speculation: SpeculativeStepper, prompt: list[list[int]],
           sampling: Sampling, *, room: int, max_sentences: int, max_tokens: int | None = None,
           stop_threshold: float | None = None, **loop_options) -> Iterator[SentenceEvent | TurnEnd]:
    """edge-chat's answer to `prompt` (token ids of its sentences) through `stepper`: the stop rule
    (P(stop) >= `stop_threshold`, None: the bundle's; from the second sentence on; at most
    `max_sentences`) goes to the cloud now, with the prompt's Append (`speculation.begin_turn`: it also
    drops whatever the cloud guessed past the conversation), then the sentence loop (`loop_options`:
    sentence_loop's). Shared by ChatSession.turn and bench.rtt --chat."""
    threshold = runtime.bundle.stop_threshold if stop_threshold is None else stop_threshold
    speculation.begin_turn(turn_decoding(sampling, max_tokens, threshold, MIN_ANSWER_SENTENCES,
                                         min(max_sentences, room)))
    return sentence_loop(runtime, stepper, prompt, sampling, room=room, max_sentences=max_sentences,
                         max_tokens=max_tokens, stop_threshold=threshold, min_sentences=MIN_ANSWER_SENTENCES,
                         **loop_options)


@dataclass
class ChatSession:
    runtime: EdgeRuntime
    client_factory: Callable[[], CloudClient]
    target: str
    wire_dtype: str = "float32"
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S
    step_timeout: float | None = DEFAULT_STEP_TIMEOUT_S  # each round trip on the stream; None or 0: no limit
    tls: bool = False  # the channel uses TLS (said when the server cannot be reached)
    notify: Callable[[str], None] = lambda message: None
    attempts: int = DEFAULT_ATTEMPTS  # tries to reach the session again after its stream broke (and to connect)
    backoff_s: float = DEFAULT_BACKOFF_S  # the wait before the second try; doubled each try, at most 2 s
    history: list[np.ndarray] = field(default_factory=list)  # acknowledged vectors, [d] each
    turns: int = 0
    rebuilds: int = 0  # sessions rebuilt from the history (each said through `notify`, once)
    resumes: int = 0  # reconnects that found the session still held (nothing recomputed; said too)
    speculate: int = 0  # sentence-level speculation: sentences the cloud may run ahead (edge.speculate); 0 = off
    tolerance: float = TOLERANCE  # how far the cloud's guess of a sentence vector may be from the edge's

    def __post_init__(self) -> None:
        self.client: CloudClient | None = None
        self.conv: Conversation | None = None
        self.info = None
        self.room = 0  # sentences a session may hold (prompt + answers, all turns)
        self._lost = "its stream had ended"  # why self.conv is None (said when it is rebuilt)
        self.session_key = new_session_key()  # routes every call of this conversation (balancer affinity)
        self.session_id = ""  # the server's id of the session, once opened
        self._resumable = False  # the server may still hold session_id with exactly our history
        self._waited_for_detach = False  # this reconnect has waited once for the server to see a cut stream
        self.stepper = SpeculativeStepper(tolerance=self.tolerance)  # checks the cloud's guesses (speculate > 0)

    # ------------------------------------------------------------ connection

    def connect(self) -> None:
        """Check the server serves the other half of this edge's model, then open a session
        (a server that is unavailable for a moment, a replica draining, is tried again)."""
        self._retrying(lambda: self._reopen(history=False))

    def _explain(self, e: CloudError, timeout: float | None = None) -> str:
        return explain(e, self.target, timeout, self.tls)

    def _new_client(self) -> CloudClient:
        try:
            client = self.client_factory()
        except (OSError, ValueError) as e:
            raise EdgeError(f"cannot set up the connection to {self.target}: {e}") from None
        client.session_key = self.session_key
        return client

    def _model_info(self, client: CloudClient):
        try:
            info = client.model_info(timeout=self.connect_timeout)
        except CloudError as e:
            if _retryable(e):
                raise _Attempt(e, self._explain(e, self.connect_timeout)) from None
            raise EdgeError(self._explain(e, self.connect_timeout)) from None
        problem = self.runtime.bundle.cloud_mismatch(info.model_id, info.dim, info.weights_sha256,
                                                     f"the server at {self.target} serves", "refusing to chat")
        if problem is not None:
            raise EdgeError(problem)
        return info

    def _reopen(self, history: bool) -> None:
        """A fresh channel, the model checked, and the session: resumed when the server still holds it
        with exactly our history, else rebuilt from the history (or a new one: history=False).
        _Attempt for a failure worth another try, EdgeError for one that is not."""
        self._drop_stream(self._lost, self._resumable)
        old, self.client = self.client, None
        if old is not None:
            old.close()
        self.client = self._new_client()
        self.info = self._model_info(self.client)
        hist = np.stack(self.history) if history and self.history else None
        resume = self.session_id if hist is not None and self._resumable else ""
        try:
            self.conv = self.client.conversation(self.runtime.model_id, self.runtime.d_model, session_id=resume,
                                                 history=hist, dtype=self.wire_dtype, reply_dtype=self.wire_dtype,
                                                 step_timeout=self.step_timeout, keep_on_disconnect=True,
                                                 speculate=self.speculate)
        except CloudError as e:
            self.conv = None
            if e.code == grpc.StatusCode.FAILED_PRECONDITION and resume and not _mismatch(e):
                if "attached" in e.details and not self._waited_for_detach:
                    # the server has not seen the cut stream end yet (it is ending): once, a moment
                    self._waited_for_detach = True
                    raise _Attempt(e, self._explain(e)) from None
                # still attached, or one step ahead of us (a reply lost on the way): a new session from
                # the history (the server frees the old one at its idle timeout)
                self._resumable = False
                raise _Attempt(e, self._explain(e), at_once=True) from None
            if _retryable(e):
                if e.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in (e.details or ""):
                    # the replica this key leads to is draining and the balancer has not taken it out
                    # yet: a new key leads elsewhere (the session is rebuilt wherever that is)
                    self.session_key = new_session_key()
                raise _Attempt(e, self._explain(e)) from None
            raise EdgeError(self._explain(e)) from None
        expected = len(hist) if hist is not None else 0
        if self.conv.past_length != expected:
            n = self.conv.past_length
            self._drop_stream(self._lost)
            raise EdgeError(f"the server opened a session of {n} sentences, expected {expected}")
        self.session_id, self._resumable = self.conv.session_id, True
        self.room = self.conv.past_length + self.conv.remaining_sentences

    def _retrying(self, action: Callable[[], None]) -> None:
        """`action` until it succeeds, at most `attempts` times with a doubling wait between tries;
        EdgeError (the last failure explained) when it never does."""
        wait = self.backoff_s
        for attempt in range(max(1, self.attempts)):
            try:
                return action()
            except _Attempt as a:
                if attempt + 1 >= max(1, self.attempts):
                    raise EdgeError(a.message) from None
                if not a.at_once:
                    time.sleep(wait * random.uniform(0.5, 1.0))  # jitter: clients of one dead replica spread
                    wait = min(2 * wait, MAX_BACKOFF_S)

    def _drop_stream(self, why: str = "its stream had ended", resumable: bool = False) -> None:
        """Forget the stream. resumable: it broke from outside between steps we know of (the server
        may still hold the session with exactly our history); False after a stream this edge gave up
        on (a deadline, an abort), whose state on the server is unknown."""
        self._lost = why
        self._resumable = self._resumable and resumable
        if self.conv is not None and not self.conv.finished:
            try:
                self.conv.cancel()
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass
        self.conv = None

    def _rebuild(self, why: str) -> None:
        """The session again (resumed where the server still holds it, else rebuilt from the history
        vectors, said through `notify` once); EdgeError if impossible."""
        self._lost, self._waited_for_detach = why, False
        n = len(self.history)
        try:
            self._retrying(lambda: self._reopen(history=True))
        except EdgeError as e:
            self._lost = why  # the next turn tries again, for the same reason
            raise EdgeError(f"the cloud session was lost ({why}) and could not be rebuilt from the {n} history "
                            f"vectors the edge keeps: {e}") from None
        if self.conv.resumed:
            self.resumes += 1
            self.notify(f"the cloud session was lost ({why}); resumed it: the server still held it (nothing rebuilt)")
            return
        self.rebuilds += 1
        self.notify(f"the cloud session was lost ({why}); rebuilt it from the {n} history vectors the edge keeps"
                    if n else f"the cloud session was lost ({why}); opened a new one (no history yet)")

    def append(self, vectors: np.ndarray) -> StepResult:
        """The stepper of the sentence loop: append [n, d] vectors. On a broken stream (a replica
        gone, drained, restarted; the network) the session is reached again (resumed or rebuilt from
        the history, on another replica behind a balancer) and the step retried, up to `attempts`
        times; EdgeError when that fails or for an error retrying cannot cure (a step deadline)."""
        why = None
        for _ in range(STEP_TRIES):
            if self.conv is None or self.conv.finished:
                self._rebuild(why or self._lost)
                # a fresh session: nothing guessed to check, and its cloud never decoded this answer's start
                self.stepper.begin_turn(turn_decoding(None))
            try:
                self.stepper.conv = self.conv
                step = self.stepper.append(vectors)
            except CloudError as e:
                why = _why(e)
                if not rebuildable(e):
                    self._drop_stream(why)
                    raise EdgeError(self._explain(e)) from None
                self._drop_stream(why, resumable=True)
                continue
            self.history.extend(np.asarray(vectors, dtype=np.float32))
            return step
        raise EdgeError(f"the cloud session was lost ({why}) {STEP_TRIES} times in one step; giving up (the "
                        "next turn tries again)")

    # ------------------------------------------------------------ turns

    def turn(self, text: str, sampling: Sampling, max_sentences: int = 8, max_tokens: int | None = None,
             interrupted: Callable[[], bool] = lambda: False,
             stop_threshold: float | None = None) -> Iterator[SentenceEvent | TurnEnd]:
        """One user turn: TurnError now if it cannot run (bad prompt, no room), else an iterator
        that yields each sentence as soon as it is decoded, then a TurnEnd.

        The answer ends when the cloud's P(stop) >= `stop_threshold` (None: the edge bundle's).

        `interrupted()` is checked before each sentence: the sentence yielded last is always
        appended first, so the context holds exactly what the user saw. A KeyboardInterrupt
        raised inside (a second Ctrl-C) drops the stream; the next turn rebuilds the session."""
        if max_sentences < 0:
            raise TurnError(f"max_sentences must be >= 0, got {max_sentences}")
        try:
            prompt = self.runtime.prompt_sentences(text)
        except PromptError as e:
            raise TurnError(str(e)) from None
        used = len(self.history)
        room = self.room or (self.info.max_sentences if self.info else 0)
        if used + len(prompt) >= room:
            raise TurnError(f"the conversation holds {used} of the {room} sentences this model's context has room "
                            f"for; a prompt of {len(prompt)} sentence(s) leaves no room for an answer: start a new "
                            "conversation (/reset in edge-chat, reset() in the API)")
        self.turns += 1
        events = answer(self.runtime, self, self.stepper, prompt, sampling, room=room - used - len(prompt),
                        max_sentences=max_sentences, max_tokens=max_tokens, stop_threshold=stop_threshold,
                        turn=self.turns, context_used=used, interrupted=interrupted)
        return self._dropping_on_abort(events)

    def _dropping_on_abort(self, events: Iterator) -> Iterator:
        try:
            yield from events
        except KeyboardInterrupt:
            # mid-call: the stream's state is unknown; the next append rebuilds the session
            self._drop_stream("an answer was aborted mid-step")
            raise

    def reset(self) -> None:
        """Forget the conversation: free the session on the server, clear the history, open a new one
        (under a new routing key: a new conversation)."""
        if self.conv is not None and not self.conv.finished:
            try:
                self.conv.close(keep=False)
            except CloudError:
                pass
        self.conv = None
        self.history.clear()
        self.turns = 0
        self.session_key, self.session_id, self._resumable = new_session_key(), "", False
        try:
            self._retrying(lambda: self._reopen(history=False))
        except EdgeError as e:
            self.notify(f"could not open a new session yet ({e}); the next turn will try again")

    def close(self) -> None:
        if self.conv is not None and not self.conv.finished:
            try:
                self.conv.close(keep=False)
            except Exception:  # noqa: BLE001 - closing: the server may be gone already
                self._drop_stream()
        self.conv = None
        if self.client is not None:
            self.client.close()
            self.client = None

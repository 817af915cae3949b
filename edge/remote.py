"""The edge's one stepper (`sllm.edge.loop.Stepper`): a conversation's cloud session, kept reachable.

`append(vectors)` sends sentence vectors on the session's Converse stream and returns the step. Around
that one call it does what a remote session needs, so that the sentence loop never sees it:

- model check: before any session the server must serve the other half of this edge bundle (model id,
  d, and weights whose sha256 the edge bundle recorded at export: `EdgeBundle.cloud_mismatch`);
  checked again at every reconnect.
- routing: every call carries the conversation's key (protos.client.SESSION_KEY_HEADER): random,
  picked before the first Open, kept across reconnects and rebuilds, new after reset(), and new when
  the replica it leads to refuses an Open as SHUTTING_DOWN (a balancer that has not taken a draining
  replica out yet). A balancer hashing on it (docs/deploy/README.md) sends the conversation's calls to
  the replica that holds its session.
- reconnect, resume, rebuild, failover: when the stream breaks (a replica killed, drained or restarted,
  a balancer restarted, an idle timeout, the network, a keepalive ping not answered) it reconnects on a
  fresh channel and sends Open{session_id, history}: the server that still holds the session (kept by
  keep_on_disconnect) resumes it, any other rebuilds it from the history vectors (every vector the
  cloud has acknowledged, kept here); `notify` is told once either way, and the step is sent again.
  Bounded: `attempts` tries to reach a session, with a doubling wait between them; one step goes to at
  most STEP_TRIES sessions. A step that does not come back within `step_timeout` is an EdgeError at
  once (retrying would wait as long again); the stream is dropped and the next append rebuilds the
  session under a new id (its state on the server is unknown).
- speculation (edge.speculate): the cloud's guesses are checked and accepted or corrected on the way.

Every decision is taken on status codes and ErrorReasons (edge.failures), never on message text.
"""
from __future__ import annotations

import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from sllm.edge.failures import EdgeError, explain, rebuildable, retryable, why
from sllm.edge.speculate import TOLERANCE, Speculation, decoding
from sllm.protos.client import CloudClient, CloudError, Conversation, StepResult
from sllm.protos.v1 import sllm_pb2 as pb
from sllm.runtime.edge_bundle import EdgeBundle
from sllm.sentences.sampling import AnswerOptions

DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_STEP_TIMEOUT_S = 30.0  # one round trip on the stream: a step, or a session rebuilt from history
DEFAULT_ATTEMPTS = 6  # tries to reach a session again (or to open one), waits of 0.1, 0.2, 0.4, 0.8, 1.6 s between
DEFAULT_BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0
STEP_TRIES = 3  # one step: sent on at most this many sessions (a replica dies, its successor dies too ...)


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


@dataclass
class RemoteStepper:
    model: EdgeBundle  # this edge's half: its model id, d, and the cloud weights it pairs with
    client_factory: Callable[[], CloudClient]
    target: str
    wire_dtype: str = "float32"
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S
    step_timeout: float | None = DEFAULT_STEP_TIMEOUT_S  # each round trip on the stream; None or 0: no limit
    tls: bool = False  # the channel uses TLS (said when the server cannot be reached)
    notify: Callable[[str], None] = lambda message: None
    attempts: int = DEFAULT_ATTEMPTS  # tries to reach the session again after its stream broke (and to connect)
    backoff_s: float = DEFAULT_BACKOFF_S  # the wait before the second try; doubled each try, at most 2 s
    speculate: int = 0  # sentence-level speculation: sentences the cloud may run ahead (edge.speculate); 0 = off
    tolerance: float = TOLERANCE  # how far the cloud's guess of a sentence vector may be from the edge's
    history: list[np.ndarray] = field(default_factory=list)  # acknowledged vectors, [d] each
    rebuilds: int = 0  # sessions rebuilt from the history (each said through `notify`, once)
    resumes: int = 0  # reconnects that found the session still held (nothing recomputed; said too)

    def __post_init__(self) -> None:
        self.client: CloudClient | None = None
        self.conv: Conversation | None = None
        self.info: pb.ModelInfo | None = None
        self.room = 0  # sentences a session may hold (prompt + answers, all turns)
        self._lost = "its stream had ended"  # why self.conv is None (said when it is rebuilt)
        self.session_key = new_session_key()  # routes every call of this conversation (balancer affinity)
        self.session_id = ""  # the server's id of the session, once opened
        self._resumable = False  # the server may still hold session_id with exactly our history
        self._waited_for_detach = False  # this reconnect has waited once for the server to see a cut stream
        self.speculation = Speculation(self.tolerance)  # checks the cloud's guesses (speculate > 0)

    # ------------------------------------------------------------ the Stepper

    def begin_turn(self, options: AnswerOptions | None) -> None:
        """The next append is a turn's prompt, whose answer is decoded with `options` (resolved: the stop
        threshold and cap the edge applies); they go to the cloud with it (speculation). None: the
        cloud does not guess this turn."""
        self.speculation.begin_turn(decoding(options))

    def append(self, vectors: np.ndarray) -> StepResult:
        """Append [n, d] vectors; the step of the last one. On a broken stream the session is reached
        again (resumed or rebuilt from the history, on another replica behind a balancer) and the step
        retried; EdgeError when that fails or for an error retrying cannot cure (a step deadline)."""
        lost = None
        for _ in range(STEP_TRIES):
            if self.conv is None or self.conv.finished:
                self._rebuild(lost or self._lost)
                # a fresh session: nothing guessed to check, and its cloud never decoded this answer's start
                self.begin_turn(None)
            try:
                step = self.speculation.append(self.conv, vectors)
            except CloudError as e:
                lost = why(e)
                if not rebuildable(e):
                    self.drop(lost)
                    raise EdgeError(self._explain(e), e) from None
                self.drop(lost, resumable=True)
                continue
            self.history.extend(np.asarray(vectors, dtype=np.float32))
            return step
        raise EdgeError(f"the cloud session was lost ({lost}) {STEP_TRIES} times in one step; giving up (the "
                        "next turn tries again)")

    # ------------------------------------------------------------ the session

    def connect(self) -> None:
        """Check the server serves the other half of this edge's model, then open a session
        (a server that is unavailable for a moment, a replica draining, is tried again)."""
        self._retrying(lambda: self._reopen(history=False))

    def reset(self) -> None:
        """Forget the conversation: free the session on the server, clear the history, open a new one
        (under a new routing key: a new conversation)."""
        self._close_session()
        self.history.clear()
        self.session_key, self.session_id, self._resumable = new_session_key(), "", False
        try:
            self._retrying(lambda: self._reopen(history=False))
        except EdgeError as e:
            self.notify(f"could not open a new session yet ({e}); the next turn will try again")

    def open_from(self, history: list[np.ndarray]) -> None:
        """Become a new conversation (a new session under a new routing key) that begins with `history`
        (vectors another conversation acknowledged: a branch of it); the server prefills it from them."""
        self._close_session()
        self.history = [np.asarray(v, dtype=np.float32) for v in history]
        self.session_key, self.session_id, self._resumable = new_session_key(), "", False
        self._retrying(lambda: self._reopen(history=True))

    def drop(self, cause: str = "its stream had ended", resumable: bool = False) -> None:
        """Forget the stream (the next append reaches the session again). resumable: it broke from outside
        between steps we know of (the server may still hold the session with exactly our history); False
        after a stream this edge gave up on (a deadline, an abort), whose state on the server is unknown."""
        self._lost = cause
        self._resumable = self._resumable and resumable
        if self.conv is not None and not self.conv.finished:
            try:
                self.conv.cancel()
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass
        self.conv = None

    def close(self) -> None:
        self._close_session()
        if self.client is not None:
            self.client.close()
            self.client = None

    def _close_session(self) -> None:
        """Free the session on the server (its stream closed with keep=False)."""
        if self.conv is not None and not self.conv.finished:
            try:
                self.conv.close(keep=False)
            except Exception:  # noqa: BLE001 - closing: the server may be gone already
                self.drop()
        self.conv = None

    def _explain(self, e: CloudError, timeout: float | None = None) -> str:
        return explain(e, self.target, timeout, self.tls)

    def _new_client(self) -> CloudClient:
        try:
            client = self.client_factory()
        except (OSError, ValueError) as e:
            raise EdgeError(f"cannot set up the connection to {self.target}: {e}") from None
        client.session_key = self.session_key
        return client

    def _model_info(self, client: CloudClient) -> pb.ModelInfo:
        try:
            info = client.model_info(timeout=self.connect_timeout)
        except CloudError as e:
            if retryable(e):
                raise _Attempt(e, self._explain(e, self.connect_timeout)) from None
            raise EdgeError(self._explain(e, self.connect_timeout), e) from None
        problem = self.model.cloud_mismatch(info.model_id, info.dim, info.weights_sha256,
                                            f"the server at {self.target} serves", "refusing to chat")
        if problem is not None:
            raise EdgeError(problem)
        return info

    def _reopen(self, history: bool) -> None:
        """A fresh channel, the model checked, and the session: resumed when the server still holds it
        with exactly our history, else rebuilt from the history (or a new one: history=False).
        _Attempt for a failure worth another try, EdgeError for one that is not."""
        self.drop(self._lost, self._resumable)
        old, self.client = self.client, None
        if old is not None:
            old.close()
        self.client = self._new_client()
        self.info = self._model_info(self.client)
        hist = np.stack(self.history) if history and self.history else None
        resume = self.session_id if hist is not None and self._resumable else ""
        try:
            self.conv = self.client.conversation(self.model.model_id, self.model.d_model, session_id=resume,
                                                 history=hist, dtype=self.wire_dtype, reply_dtype=self.wire_dtype,
                                                 step_timeout=self.step_timeout, keep_on_disconnect=True,
                                                 speculate=self.speculate)
        except CloudError as e:
            self.conv = None
            if resume and e.reason == pb.SESSION_ATTACHED and not self._waited_for_detach:
                # the server has not seen the cut stream end yet (it is ending): once, a moment
                self._waited_for_detach = True
                raise _Attempt(e, self._explain(e)) from None
            if resume and e.reason in (pb.SESSION_ATTACHED, pb.HISTORY_MISMATCH):
                # still attached, or one step ahead of us (a reply lost on the way): a new session from
                # the history (the server frees the old one at its idle timeout)
                self._resumable = False
                raise _Attempt(e, self._explain(e), at_once=True) from None
            if retryable(e):
                if e.reason == pb.SHUTTING_DOWN:
                    # the replica this key leads to is draining and the balancer has not taken it out
                    # yet: a new key leads elsewhere (the session is rebuilt wherever that is)
                    self.session_key = new_session_key()
                raise _Attempt(e, self._explain(e)) from None
            raise EdgeError(self._explain(e), e) from None
        expected = len(hist) if hist is not None else 0
        if self.conv.past_length != expected:
            n = self.conv.past_length
            self.drop(self._lost)
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
                    raise EdgeError(a.message, a.error) from None
                if not a.at_once:
                    time.sleep(wait * random.uniform(0.5, 1.0))  # jitter: clients of one dead replica spread
                    wait = min(2 * wait, MAX_BACKOFF_S)

    def _rebuild(self, cause: str) -> None:
        """The session again (resumed where the server still holds it, else rebuilt from the history
        vectors, said through `notify` once); EdgeError if impossible."""
        self._lost, self._waited_for_detach = cause, False
        n = len(self.history)
        try:
            self._retrying(lambda: self._reopen(history=True))
        except EdgeError as e:
            self._lost = cause  # the next turn tries again, for the same reason
            raise EdgeError(f"the cloud session was lost ({cause}) and could not be rebuilt from the {n} history "
                            f"vectors the edge keeps: {e}", e) from None
        if self.conv.resumed:
            self.resumes += 1
            self.notify(f"the cloud session was lost ({cause}); resumed it: the server still held it (nothing rebuilt)")
            return
        self.rebuilds += 1
        self.notify(f"the cloud session was lost ({cause}); rebuilt it from the {n} history vectors the edge keeps"
                    if n else f"the cloud session was lost ({cause}); opened a new one (no history yet)")

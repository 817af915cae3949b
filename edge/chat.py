"""One conversation between the edge runtime and the cloud service.

The edge keeps every sentence vector the cloud has acknowledged (the history). A turn is the
shared sentence loop (`edge.loop.sentence_loop`) with this session as its stepper: at most
`max_sentences` sentences, never more than the context holds (the session's room minus what it
already holds, prompt included), and the last generated sentence is appended too, so the next
turn (or a rebuild) sees the whole conversation.

When the stream breaks (server restarted, idle timeout, network) the next append reopens a
session from the history vectors (`Open{history}`), tells `notify` so, and retries once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import grpc
import numpy as np

from edge.loop import SentenceEvent, TurnEnd, sentence_loop
from edge.runtime import EdgeRuntime, PromptError
from edge.sampling import Sampling
from protos.client import CloudClient, CloudError, Conversation, StepResult

DEFAULT_CONNECT_TIMEOUT_S = 10.0
# a broken stream worth reopening from the history (the server lost or dropped the session)
_REBUILDABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.ABORTED, grpc.StatusCode.UNKNOWN}


class EdgeError(Exception):
    """A failure to explain to the user in one message (no traceback)."""


class TurnError(EdgeError):
    """This turn cannot run (the conversation is full, the prompt is empty); the session is intact."""


def explain(e: CloudError, target: str, timeout: float | None = None) -> str:
    """A CloudError in words: what happened and what to do."""
    code, details = e.code, e.details or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        if "shutting down" in details:
            return f"the cloud server at {target} is shutting down ({details})"
        return (f"cannot reach the cloud server at {target} ({details or 'unavailable'}); is it running? "
                "(`sllm-cloud serve --bundle DIR/cloud`, or `edge-chat --local` to start one here)")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (f"the cloud server at {target} refused the bearer token ({details}); pass the right one with "
                "--token or $SLLM_CLOUD_TOKEN")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        wait = f" within {timeout:g} s" if timeout else ""
        return f"no answer from the cloud server at {target}{wait} ({details})"
    if code == grpc.StatusCode.FAILED_PRECONDITION and ("mismatch" in details):
        return f"the edge bundle and the cloud model are not halves of the same model: {details}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"the cloud server at {target} is out of room: {details} (/reset starts a new conversation)"
    return f"the cloud server at {target} answered {code.name}: {details}"


def rebuildable(e: CloudError) -> bool:
    """Did the server lose or drop the session (worth reopening it from the history)?"""
    if e.code in _REBUILDABLE:
        return True
    # the server frees a session idle longer than its timeout and ends its stream so
    return e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "idle" in (e.details or "")


@dataclass
class ChatSession:
    runtime: EdgeRuntime
    client_factory: Callable[[], CloudClient]
    target: str
    wire_dtype: str = "float32"
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S
    notify: Callable[[str], None] = lambda message: None
    history: list[np.ndarray] = field(default_factory=list)  # acknowledged vectors, [d] each
    turns: int = 0
    rebuilds: int = 0

    def __post_init__(self) -> None:
        self.client: CloudClient | None = None
        self.conv: Conversation | None = None
        self.info = None
        self.room = 0  # sentences a session may hold (prompt + answers, all turns)
        self._lost = "its stream had ended"  # why self.conv is None (said when it is rebuilt)

    # ------------------------------------------------------------ connection

    def connect(self) -> None:
        """Check the server serves the other half of this edge's model, then open a session."""
        self.client = self._new_client()
        self.info = self._model_info(self.client)
        self._open(history=False)

    def _new_client(self) -> CloudClient:
        try:
            return self.client_factory()
        except (OSError, ValueError) as e:
            raise EdgeError(f"cannot set up the connection to {self.target}: {e}") from None

    def _model_info(self, client: CloudClient):
        try:
            info = client.model_info(timeout=self.connect_timeout)
        except CloudError as e:
            raise EdgeError(explain(e, self.target, self.connect_timeout)) from None
        rt = self.runtime
        if info.model_id != rt.model_id or info.dim != rt.d_model:
            raise EdgeError(
                f"the edge bundle and the cloud model are not halves of the same model: the edge bundle "
                f"{rt.path} holds {rt.model_id} (d={rt.d_model}), the server at {self.target} serves "
                f"{info.model_id} (d={info.dim}); refusing to chat. Use the edge/ and cloud/ of one export.")
        return info

    def _open(self, history: bool) -> None:
        hist = np.stack(self.history) if history and self.history else None
        try:
            self.conv = self.client.conversation(self.runtime.model_id, self.runtime.d_model, history=hist,
                                                 dtype=self.wire_dtype, reply_dtype=self.wire_dtype)
        except CloudError as e:
            self.conv = None
            raise EdgeError(explain(e, self.target, self.connect_timeout)) from None
        if self.conv.past_length != len(self.history if history else []):
            n = self.conv.past_length
            self._drop_stream()
            raise EdgeError(f"the server opened a session of {n} sentences, expected "
                            f"{len(self.history) if history else 0}")
        self.room = self.conv.past_length + self.conv.remaining_sentences

    def _drop_stream(self, why: str = "its stream had ended") -> None:
        self._lost = why
        if self.conv is not None and not self.conv.finished:
            try:
                self.conv.cancel()
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass
        self.conv = None

    def _rebuild(self, why: str) -> None:
        """A fresh channel and a session rebuilt from the history vectors; EdgeError if impossible."""
        self._drop_stream()
        old = self.client
        n = len(self.history)
        try:
            self.client = self._new_client()
            self.info = self._model_info(self.client)
            self._open(history=True)
        except EdgeError as e:
            self._lost = why  # the next turn tries again, for the same reason
            raise EdgeError(f"the cloud session was lost ({why}) and could not be rebuilt from the {n} history "
                            f"vectors the edge keeps: {e}") from None
        finally:
            if old is not None and old is not self.client:
                old.close()
        self.rebuilds += 1
        self.notify(f"the cloud session was lost ({why}); rebuilt it from the {n} history vectors the edge keeps"
                    if n else f"the cloud session was lost ({why}); opened a new one (no history yet)")

    def append(self, vectors: np.ndarray) -> StepResult:
        """The stepper of the sentence loop: append [n, d] vectors; on a broken stream, rebuild
        the session from the history and retry once; EdgeError when that fails."""
        if self.conv is None or self.conv.finished:
            self._rebuild(self._lost)
        try:
            step = self.conv.append(vectors)
        except CloudError as e:
            if not rebuildable(e):
                self._drop_stream()
                raise EdgeError(explain(e, self.target)) from None
            self._rebuild(f"{e.code.name}: {e.details}" if e.details else e.code.name)
            try:
                step = self.conv.append(vectors)
            except CloudError as e2:
                self._drop_stream()
                raise EdgeError(explain(e2, self.target)) from None
        self.history.extend(np.asarray(vectors, dtype=np.float32))
        return step

    # ------------------------------------------------------------ turns

    def turn(self, text: str, sampling: Sampling, max_sentences: int = 8, max_tokens: int | None = None,
             interrupted: Callable[[], bool] = lambda: False) -> Iterator[SentenceEvent | TurnEnd]:
        """One user turn: TurnError now if it cannot run (bad prompt, no room), else an iterator
        that yields each sentence as soon as it is decoded, then a TurnEnd.

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
        events = sentence_loop(self.runtime, self, prompt, sampling, room=room - used - len(prompt),
                               max_sentences=max_sentences, max_tokens=max_tokens, turn=self.turns,
                               context_used=used, interrupted=interrupted)
        return self._dropping_on_abort(events)

    def _dropping_on_abort(self, events: Iterator) -> Iterator:
        try:
            yield from events
        except KeyboardInterrupt:
            # mid-call: the stream's state is unknown; the next append rebuilds the session
            self._drop_stream("an answer was aborted mid-step")
            raise

    def reset(self) -> None:
        """Forget the conversation: free the session on the server, clear the history, open a new one."""
        if self.conv is not None and not self.conv.finished:
            try:
                self.conv.close(keep=False)
            except CloudError:
                pass
        self.conv = None
        self.history.clear()
        self.turns = 0
        try:
            self._open(history=False)
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

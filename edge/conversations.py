"""Cloud sessions kept by conversation prefix, for a stateless chat API (edge.gateway): each request carries
the whole conversation; the session that already holds its longest known prefix answers it, so only the new
messages' sentences are encoded and sent.

    pool = Conversations(open_chat, limit=64)        # open_chat(): a new sllm.edge.api.EdgeChat
    reply = pool.answer(messages, options, stop=[...], max_tokens=..., emit=print, cancelled=event)

How messages become sentences (the model is a plain language model over sentences: no roles, no turn markers):
every message, whatever its role, is segmented into sentences on its own, in order; the answer's sentences
follow. A single user message is therefore exactly `edge-chat --prompt TEXT`, and a conversation the server
answered goes on exactly as edge-chat's conversation (the answer's own sentence vectors stay in the session);
a history it never saw (or edited) is read as text.

Which session answers: the held conversation sharing the longest prefix of messages (role and content equal).
  - it holds exactly that prefix and is idle: it answers in place (its new messages appended);
  - it holds more (the request branches off it) or is busy: a new session is opened from the prefix's sentence
    vectors (the cloud prefills them; the edge encodes nothing again), the held one is left as it was;
  - none shares a first message: a new session.
At most `limit` conversations are held; the least recently used idle one is closed (its cloud session freed).
After an answer the conversation is keyed by exactly what its session holds: an answer cut by a stop string
or max_tokens holds the sentences before the cut one (the client's next request branches from that).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from sllm.edge.api import EdgeChat
from sllm.edge.failures import TurnError
from sllm.edge.openai_api import Message
from sllm.edge.runtime import PromptError
from sllm.sentences.sampling import AnswerOptions

# an answer's end (TurnEnd.reason, or ours) -> OpenAI's finish_reason
FINISH = {"stop": "stop", "empty": "stop", "repeat": "stop", "stop_string": "stop", "interrupted": "stop",
          "max_sentences": "length", "context_full": "length", "max_tokens": "length", "cancelled": "stop"}


@dataclass
class Held:
    """A conversation and the messages its session holds, with each one's sentences and tokens."""

    chat: EdgeChat | None  # None until its session is opened
    messages: list[Message] = field(default_factory=list)
    sentences: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    busy: bool = False
    history: list = field(default_factory=list)  # a branch's prefix vectors, until its session holds them


@dataclass
class Reply:
    text: str
    end_reason: str  # TurnEnd.reason, or "stop_string", "max_tokens", "cancelled"
    prompt_tokens: int  # every message's tokens, as the model reads them (held or new)
    completion_tokens: int  # tokens of the answer's sentences decoded (a cut sentence counts up to the cut)
    reused_messages: int  # messages the session already held

    @property
    def finish_reason(self) -> str:
        return FINISH[self.end_reason]


class Conversations:
    def __init__(self, open_chat: Callable[[], EdgeChat], limit: int = 64):
        self.open_chat, self.limit = open_chat, max(1, limit)
        self._held: OrderedDict[int, Held] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.opened = self.forked = self.extended = 0  # conversations started, branched, answered in place

    def __len__(self) -> int:
        return len(self._held)

    # ------------------------------------------------------------ which session

    def _take(self, messages: list[Message]) -> tuple[Held, int, Held | None]:
        """(the conversation that answers, messages it reuses, the held one to branch from (None: in place or
        new)). In place, it is marked busy here; a branch or a new one is filled in by `_start`."""
        with self._lock:
            best, best_k = None, 0
            for held in self._held.values():
                k = _common(held.messages, messages, len(messages) - 1)  # the last message is always new
                if k > best_k:
                    best, best_k = held, k
            if best is not None and best_k == len(best.messages) and not best.busy:
                best.busy = True
                self._held.move_to_end(id(best))
                return best, best_k, None
            if best is None:
                return Held(None, busy=True), 0, None
            n = sum(best.sentences[:best_k])  # the prefix's vectors, copied now (the held one may grow meanwhile)
            branch = Held(None, list(messages[:best_k]), best.sentences[:best_k], best.tokens[:best_k], busy=True)
            branch.history = list(best.chat.session.stepper.history[:n])
            return branch, best_k, best

    def _start(self, held: Held) -> None:
        """Open `held`'s session: a new one, or one holding the vectors of the prefix it branches with."""
        chat = self.open_chat()
        try:
            if held.messages:
                chat.session.stepper.open_from(held.history)
        except BaseException:
            chat.close()
            raise
        held.chat, held.history = chat, []
        with self._lock:
            self._held[id(held)] = held
            self._evict()

    def _evict(self) -> None:
        while len(self._held) > self.limit:
            victim = next((h for h in self._held.values() if not h.busy and h.chat is not None), None)
            if victim is None:
                return  # every one is answering: over the limit until one ends
            del self._held[id(victim)]
            threading.Thread(target=victim.chat.close, daemon=True).start()  # frees the cloud session

    def _drop(self, held: Held) -> None:
        with self._lock:
            self._held.pop(id(held), None)
        if held.chat is not None:
            held.chat.close()

    # ------------------------------------------------------------ one answer

    def answer(self, messages: list[Message], options: AnswerOptions, *, stop: list[str] = (),
               max_tokens: int | None = None, emit: Callable[[str], None] = lambda text: None,
               cancelled: threading.Event | None = None) -> Reply:
        """Answer the conversation `messages`: `emit(text)` for each piece of the answer as soon as it is decoded
        (a sentence, less any tail that could begin a stop string), then the Reply. Blocking; one thread per
        answer. `cancelled` set: ends after the sentence being decoded (nothing more is sent to the cloud).
        TurnError for a conversation that cannot be answered (empty, no room), EdgeError from the cloud."""
        cancelled = cancelled or threading.Event()
        held, k, source = self._take(messages)
        try:
            if held.chat is None:
                self._start(held)
            with self._lock:
                if source is not None:
                    self.forked += 1
                elif k:
                    self.extended += 1
                else:
                    self.opened += 1
            runtime = held.chat.runtime
            new = messages[k:]
            texts = [m.content for m in new if m.content.strip()]
            if not texts:
                raise TurnError("the conversation has no new text to answer: its new messages are empty")
            counts, tokens = [], []
            for m in new:
                ids = runtime.prompt_sentences(m.content) if m.content.strip() else []
                counts.append(len(ids))
                tokens.append(sum(len(s) for s in ids))
            base = len(held.chat.session.stepper.history)
            held.chat.options = options
            answered = _run(held.chat.ask(texts), runtime, list(stop), max_tokens, emit, cancelled)
        except (PromptError, TurnError) as e:  # this request only: the conversation is as it was
            if held.messages:
                self._release(held)
            else:
                self._drop(held)  # a new session that holds nothing: not worth keeping
            raise TurnError(str(e)) from None
        except BaseException:
            self._drop(held)  # the cloud failed mid-answer: the next request starts from its prefix again
            raise
        said = len(held.chat.session.stepper.history) - base - sum(counts)
        held.messages = held.messages + new + [Message("assistant", "".join(answered.kept[:said]))]
        held.sentences = held.sentences + counts + [said]
        held.tokens = held.tokens + tokens + [sum(answered.kept_tokens[:said])]
        self._release(held)
        return Reply(answered.text, answered.end_reason, sum(held.tokens[:-1]), answered.completion_tokens, k)

    def _release(self, held: Held) -> None:
        with self._lock:
            held.busy = False
            self._evict()

    def close(self) -> None:
        with self._lock:
            held, self._held = list(self._held.values()), OrderedDict()
        for h in held:
            if h.chat is not None:
                h.chat.close()


def _common(a: list[Message], b: list[Message], most: int) -> int:
    k = 0
    for x, y in zip(a[:most], b[:most]):
        if x != y:
            break
        k += 1
    return k


@dataclass
class _Answered:
    text: str
    end_reason: str
    completion_tokens: int
    kept: list[str]  # the answer's sentences, whole (those the session may hold)
    kept_tokens: list[int]


def _run(answer, runtime, stop: list[str], max_tokens: int | None, emit: Callable[[str], None],
         cancelled: threading.Event) -> _Answered:
    """Read `answer` (an edge.api.Answer) sentence by sentence, emitting text, until its end, a stop string,
    max_tokens or a cancel. A sentence cut short is never appended to the session; a whole last sentence is."""
    text, sent, used = "", 0, 0  # text so far, how much of it was emitted, tokens
    kept, kept_tokens = [], []
    reason = None
    for sentence in answer:
        piece, cut = sentence.text, False
        if max_tokens is not None and used + len(sentence.ids) >= max_tokens:
            left = max_tokens - used
            cut = left < len(sentence.ids)
            piece = runtime.detokenize(sentence.ids[:left]) if cut else piece
            used += left
            reason = "max_tokens"
        else:
            used += len(sentence.ids)
        before = len(text)
        text += piece
        hit = _find_stop(text, stop, max(0, before - max((len(s) for s in stop), default=0)))
        if hit is not None:
            text, reason, cut = text[:hit], "stop_string", True
        if not cut:
            kept.append(piece)
            kept_tokens.append(len(sentence.ids))
        safe = len(text) if reason else _safe_end(text, stop)
        if safe > sent:
            emit(text[sent:safe])
            sent = safe
        if reason is None and cancelled.is_set():
            reason = "cancelled"
        if reason is not None:
            if cut:
                answer.close()  # the cut sentence stays out of the session
            else:
                answer.stop()  # the sentence just read is appended, nothing more is decoded
                for _ in answer:
                    pass
            break
    else:
        reason = answer.end.reason
        if len(text) > sent:
            emit(text[sent:])
    return _Answered(text, reason, used, kept, kept_tokens)


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def _safe_end(text: str, stops: list[str]) -> int:
    """How much of `text` may be shown: all but a tail that could be the beginning of a stop string."""
    end = len(text)
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                end = min(end, len(text) - n)
                break
    return end

"""Sessions: one conversation's KV cache, its limits, and when it is freed.

A session belongs to the caller that opened it (its owner: a hash of its bearer token, see
cloud.auth.owner_of) and is filed under (owner, id): an Open from another owner never finds it,
whatever id it sends; a rebuild under the same id by another owner makes that owner's own session.
Ids never appear in logs or error messages; logs carry `Session.tag`, a keyed hash of
(owner, id) that cannot be turned back into either.

A session is *attached* while a Converse stream uses it, *detached* after Close{keep:true}.
Freed: on Close{keep:false}, when its stream ends any other way (cancel, deadline, error,
end of input), when idle longer than the idle timeout, or evicted (least recently used
detached sessions first) to make room for a new session or for KV cache growth.
Attached sessions are never evicted for room: past the limits, requests get
RESOURCE_EXHAUSTED instead.

Speculation (issue 17): a session whose stream asked for it may hold speculative sentences after
its `confirmed` ones: the cloud's own guesses, appended by the batcher. They count against the
session's sentence limit and the KV budget like any other (`length` includes them) and are freed
by `truncate` (a new turn or a correction from the edge, a detach); `accept` confirms the first.
Every truncation increments `epoch`: a speculative step computed for an older epoch is dropped.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from sllm.cloud.errors import ServiceError, invalid
from sllm.cloud.jsonlog import log
from sllm.cloud.metrics import Metrics
from sllm.modeling.opt_block import KVSlot
from sllm.protos.v1 import sllm_pb2 as pb
from sllm.sentences.sampling import AnswerOptions

SESSION_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
REMEMBER_GONE = 10000  # ids of freed sessions remembered (per owner), to say "expired" rather than "unknown"
_TAG_KEY = secrets.token_bytes(32)  # per process: tags correlate log lines, and reveal nothing else


def new_session_id() -> str:
    return uuid.uuid4().hex


def check_session_id(session_id: str) -> str:
    if not SESSION_ID.match(session_id):
        raise invalid("open.session_id is not a session id: 1-128 characters from A-Z a-z 0-9 . _ : -")
    return session_id


def owner_tag(owner: str) -> str:
    """What logs and metrics show of an owner (a caller's token or certificate): 12 hex digits of an HMAC."""
    return hmac.new(_TAG_KEY, f"owner\0{owner}".encode(), hashlib.sha256).hexdigest()[:12]


def session_tag(owner: str, session_id: str) -> str:
    """What logs show instead of a session id: 12 hex digits of an HMAC under a key of this process."""
    return hmac.new(_TAG_KEY, f"{owner}\0{session_id}".encode(), hashlib.sha256).hexdigest()[:12]


@dataclass(eq=False)
class Session:
    id: str
    owner: str = ""  # cloud.auth.owner_of of the caller that opened it
    length: int = 0  # sentences in the KV cache
    kv: KVSlot | None = None  # its keys/values (the engine writes them; `length` positions are kept)
    last_hidden: np.ndarray | None = None  # the last step's answer, returned on resume
    last_stop_logits: np.ndarray | None = None
    attached: bool = False
    end_stream: Callable[[ServiceError], None] | None = None  # ends the attached stream with this status
    reserved: int = 0  # sentences of a step in flight
    last_active: float = field(default_factory=time.monotonic)
    created: float = field(default_factory=time.monotonic)
    steps: int = 0
    freed: bool = False
    free_reason: str = ""
    # speculation (issue 17); all of it under the store's lock
    confirmed: int = 0  # sentences the edge sent or accepted; length - confirmed are speculative
    speculate: int = 0  # how far ahead its stream lets the cloud run (0 = off)
    epoch: int = 0  # incremented by every truncation
    spec: list = field(default_factory=list)  # (hidden, stop_logits) of each speculative sentence, in order
    tail: tuple | None = None  # (hidden, stop_logits) of the last sentence, confirmed or not: what to decode next
    speculating: bool = False  # a speculative step is queued or running
    on_speculative: Callable | None = None  # the attached stream's sink for speculative steps (any thread)
    declined_at: tuple | None = None  # (epoch, length) of the last "declined" notice sent
    spec_dtype: type = np.float32  # the dtype of the edge's vectors on the wire (guesses are rounded alike)
    guess: bool = True  # the edge lets the cloud guess this turn (not a sampled one)
    # how the edge decodes the turn's answer and where it ends it (no guess past it); None: an old client's
    # (plain greedy, the termination head's argmax from the first sentence, no cap)
    decoding: AnswerOptions | None = None
    answer_start: int = 0  # where the current turn's answer starts (after its prompt)
    answer_tokens: dict = field(default_factory=dict)  # position -> the tokens the cloud guessed there
    spec_accepted: int = 0  # guesses the edge accepted
    spec_wasted: int = 0  # guesses computed and then dropped (rewound or corrected)
    guessing_stopped: bool = False  # too many of its guesses were dropped: it gets no more

    def __post_init__(self) -> None:
        self.key = (self.owner, self.id)  # where the store files it
        self.tag = session_tag(self.owner, self.id)  # what logs show

    @property
    def kv_bytes(self) -> int:
        """Bytes of the held sentences, as the KV budget counts them (the slot holds whole pages of them:
        less than KVSlot.PAGE sentences more). From `length`, not the slot's: a rollback frees its
        sentences at once, while a step still running may hold the slot."""
        kv = self.kv
        return 0 if kv is None or not kv.capacity else kv.nbytes // kv.capacity * self.length


@dataclass
class OwnerUsage:
    sessions: int = 0
    sentences: int = 0  # held + reserved, for its KV quota
    refused_total: int = 0  # requests refused for its quota
    guess_seconds: float = 0.0  # model-thread time spent guessing for it (cloud.guess_shares)


class SessionStore:
    def __init__(self, *, max_sessions: int, max_sentences: int, idle_timeout_s: float, kv_budget_bytes: int,
                 kv_bytes_per_sentence: int, metrics: Metrics, new_slot: Callable[[], KVSlot],
                 owner_max_sessions: int = 0, owner_kv_budget_bytes: int = 0, answer_guess_max: int = 64):
        """owner_*: one owner's quota of sessions and of the KV budget (0: the whole limit)."""
        self.max_sessions = max_sessions
        self.owner_max_sessions = owner_max_sessions or max_sessions
        self.owner_kv_budget_bytes = owner_kv_budget_bytes or kv_budget_bytes
        self.owners: dict[str, OwnerUsage] = {}  # what each owner holds (quotas, per-owner metrics)
        self.answer_guess_max = answer_guess_max  # sentences of one answer the cloud may guess
        self.max_sentences = max_sentences
        self.idle_timeout_s = idle_timeout_s
        self.kv_budget_bytes = kv_budget_bytes
        self.per_sentence = kv_bytes_per_sentence
        self.metrics = metrics
        self.new_slot = new_slot
        self.lock = threading.RLock()
        # (owner, id) -> session, least recently active first
        self.sessions: OrderedDict[tuple[str, str], Session] = OrderedDict()
        self.gone: OrderedDict[tuple[str, str], str] = OrderedDict()  # freed (owner, id) -> why
        self.sentences_in_use = 0  # held + reserved, for the KV budget
        # speculation counters (Stats)
        self.speculative_steps_total = 0
        self.speculation_accepted_total = 0
        self.speculation_dropped_total = 0
        self.speculation_decode_tokens_total = 0
        self.speculation_stopped_total = 0  # sessions that lost guessing (too many dropped guesses)

    # -- opening ---------------------------------------------------------------------------
    def acquire(self, owner: str, session_id: str | None, history_len: int | None,
                end_stream) -> tuple[Session, bool]:
        """(session, resumed) for an Open by `owner`. A session of this owner held under
        `session_id` is resumed (it must be detached, and `history_len`, when given, must equal its
        length); an id this owner does not hold is created when there is history to rebuild it
        from, else NOT_FOUND; no id creates a new session with an id the server picks."""
        with self.lock:
            if session_id:
                held = self.sessions.get((owner, session_id))
                if held is not None:
                    if held.attached:
                        raise ServiceError(pb.SESSION_ATTACHED, "this session is attached to another open stream; "
                                                                "close or cancel that stream first")
                    if history_len is not None and history_len != held.length:
                        raise ServiceError(pb.HISTORY_MISMATCH, f"this session holds {held.length} sentences but "
                                           f"open.history has {history_len}; send the full history, or a new "
                                           "session id")
                    self._attach(held, end_stream)
                    return held, True
                if history_len is None:
                    why = self.gone.get((owner, session_id))
                    if why:
                        raise ServiceError(pb.SESSION_NOT_FOUND, f"this session is no longer held ({why}); rebuild it "
                                                                 "with Open{session_id, history}")
                    raise ServiceError(pb.SESSION_NOT_FOUND, "unknown session; rebuild it with Open{session_id, "
                                                             "history} or open a new one")
            if history_len is not None and history_len > self.max_sentences:
                raise ServiceError(pb.SESSION_FULL, f"open.history has {history_len} sentences; a session holds at "
                                                    f"most {self.max_sentences}")
            usage = self._usage(owner)
            # an owner's quota is checked only where it is tighter than the server's limit (with one owner,
            # or none authenticated, the server's own message is the true one)
            if (self.owner_max_sessions < self.max_sessions and usage.sessions >= self.owner_max_sessions
                    and not self._evict_one("to make room for a new session of its owner", owner=owner)):
                usage.refused_total += 1
                raise ServiceError(pb.SERVER_FULL, f"this caller (token or client certificate) holds its quota of "
                                   f"{self.owner_max_sessions} sessions (--owner-share of --max-sessions), all in "
                                   "use; close one or retry later")
            if len(self.sessions) >= self.max_sessions and not self._evict_one("to make room for a new session"):
                raise ServiceError(pb.SERVER_FULL, f"the server holds its maximum of {self.max_sessions} sessions, all "
                                                   "in use; retry later")
            s = Session(session_id or new_session_id(), owner, kv=self.new_slot())
            self.sessions[s.key] = s
            usage.sessions += 1
            self.gone.pop(s.key, None)
            self._attach(s, end_stream)
        self.metrics.session_opened()
        log("session_open", session=s.tag, rebuilt_from=history_len)
        return s, False

    def _attach(self, s: Session, end_stream) -> None:
        s.attached, s.end_stream = True, end_stream
        self._touch(s)

    def _touch(self, s: Session) -> None:
        s.last_active = time.monotonic()
        if self.sessions.get(s.key) is s:
            self.sessions.move_to_end(s.key)

    def detach(self, s: Session, reason: str = "Close{keep: true}") -> None:
        with self.lock:
            s.attached, s.end_stream = False, None
            self.stop_speculating(s)
            self._touch(s)
        log("session_detach", session=s.tag, length=s.length, reason=reason)

    def hand_back(self, idle_s: float, error: ServiceError) -> int:
        """A draining server: end the streams of attached sessions with no step in flight for `idle_s`
        seconds (a conversation between turns) with `error` (SHUTTING_DOWN), so their clients move to
        another replica on their next turn; answers in progress go on. Returns how many were ended."""
        now = time.monotonic()
        with self.lock:
            idle = [(s, s.end_stream) for s in self.sessions.values()
                    if s.attached and s.end_stream is not None and not s.reserved and now - s.last_active >= idle_s]
        for _, end_stream in idle:  # outside the lock: ending a stream runs grpc callbacks
            end_stream(error)
        return len(idle)

    # -- steps -----------------------------------------------------------------------------
    def reserve(self, s: Session, n: int) -> None:
        """Room for `n` more sentences in session `s` (sentence limit + KV budget), or RESOURCE_EXHAUSTED."""
        with self.lock:
            if s.freed:
                raise ServiceError(pb.SESSION_NOT_FOUND, f"this session is no longer held ({s.free_reason})")
            if s.length + s.reserved + n > self.max_sentences:
                raise ServiceError(pb.SESSION_FULL, f"this session holds {s.length} sentences; {n} more would pass "
                                                    f"the limit of {self.max_sentences} per session; start a new "
                                                    "conversation")
            usage = self._usage(s.owner)
            while (self.owner_kv_budget_bytes < self.kv_budget_bytes
                   and (usage.sentences + n) * self.per_sentence > self.owner_kv_budget_bytes):
                if not self._evict_one("to make room in its owner's KV quota", keep=s, owner=s.owner):
                    usage.refused_total += 1
                    raise ServiceError(
                        pb.SERVER_FULL, f"this caller (token or client certificate) holds its KV cache quota "
                        f"({self.owner_kv_budget_bytes} bytes, --owner-share of --kv-budget-mb): "
                        f"{usage.sentences * self.per_sentence} bytes in {usage.sessions} sessions; {n} more "
                        f"sentences need {n * self.per_sentence}; close a session or retry later")
            while (self.sentences_in_use + n) * self.per_sentence > self.kv_budget_bytes:
                if not self._evict_one("to make room in the KV cache budget", keep=s):
                    raise ServiceError(
                        pb.SERVER_FULL, f"the KV cache budget ({self.kv_budget_bytes} bytes) is full: "
                        f"{self.sentences_in_use * self.per_sentence} bytes held by {len(self.sessions)} sessions; "
                        f"{n} more sentences need {n * self.per_sentence}; retry later")
            s.reserved += n
            self._use(s, n)
            self._touch(s)

    def release(self, s: Session, n: int) -> None:
        """A reserved step that failed: give its room back."""
        with self.lock:
            if not s.freed:
                s.reserved -= n
                self._use(s, -n)
                self._give_back(s)

    def commit(self, s: Session, n: int, hidden: np.ndarray, stop_logits: np.ndarray) -> bool:
        """Keep a step whose keys/values the engine wrote after the session's `length` sentences."""
        with self.lock:
            if s.freed:
                return False
            s.reserved -= n
            s.length += n
            s.kv.length = s.length
            s.last_hidden, s.last_stop_logits = hidden, stop_logits
            s.confirmed, s.spec, s.tail = s.length, [], (hidden, stop_logits)
            s.steps += 1
            self._give_back(s)
            self._touch(s)
            return True

    # -- speculation -------------------------------------------------------------------------
    def truncate(self, s: Session, position: int) -> int:
        """Drop the sentences from `position` on (speculative ones, or confirmed ones the edge rewrites)
        and everything in flight for them (epoch + 1). Returns how many were dropped."""
        with self.lock:
            if s.freed:
                raise ServiceError(pb.SESSION_NOT_FOUND, f"this session is no longer held ({s.free_reason})")
            if position > s.confirmed:
                raise invalid(f"append.position {position} is past the {s.confirmed} sentences this session "
                              "holds (confirmed); send the sentences in between first")
            dropped = s.length - position
            s.spec_wasted += s.length - max(position, s.confirmed)
            self.speculation_dropped_total += s.length - max(position, s.confirmed)
            if position < s.confirmed:  # a rewrite of confirmed sentences: their last step is gone
                s.last_hidden = s.last_stop_logits = s.tail = None
                s.spec = []
            else:
                s.spec = s.spec[:position - s.confirmed]
                s.tail = s.spec[-1] if s.spec else (s.last_hidden, s.last_stop_logits)
            s.length, s.confirmed = position, min(s.confirmed, position)
            s.answer_tokens = {p: t for p, t in s.answer_tokens.items() if p < position}
            self._use(s, -dropped)
            s.epoch += 1
            if not s.speculating:  # else the batcher sets the slot's length before its next pass
                s.kv.length = min(s.kv.length, position)
                self._give_back(s)
            self._touch(s)
            return dropped

    def accept(self, s: Session, position: int) -> None:
        """The edge confirms the speculative sentence at `position` (the first unconfirmed one)."""
        with self.lock:
            if s.freed:
                raise ServiceError(pb.SESSION_NOT_FOUND, f"this session is no longer held ({s.free_reason})")
            if position != s.confirmed or position >= s.length:
                raise ServiceError(pb.OUT_OF_ORDER, f"accept.position {position} is not the first speculative sentence "
                                   f"of this session (it holds {s.confirmed} confirmed and {s.length - s.confirmed} "
                                   "speculative ones)")
            s.last_hidden, s.last_stop_logits = s.spec.pop(0)
            s.confirmed += 1
            s.spec_accepted += 1
            self.speculation_accepted_total += 1
            self._touch(s)

    def stop_speculating(self, s: Session) -> None:
        """No more speculation for `s` (its stream ends or detaches): drop its speculative sentences."""
        with self.lock:
            s.speculate, s.on_speculative = 0, None
            if not s.freed and s.length > s.confirmed:
                self.truncate(s, s.confirmed)

    def may_guess(self, s: Session) -> bool:
        """Guessing pays for itself (lock held): a session whose dropped guesses outrun its accepted ones by
        more than two windows guesses no more (so its guesses cost at most about twice what accepted ones
        do), and no answer is guessed past `answer_guess_max` sentences (bounded work per answer, however
        far the edge lets it run)."""
        if s.spec_wasted > s.spec_accepted + 2 * s.speculate:
            if not s.guessing_stopped:
                s.guessing_stopped = True
                self.speculation_stopped_total += 1
                log("speculation_stopped", session=s.tag, accepted=s.spec_accepted, wasted=s.spec_wasted)
            return False
        return s.length - s.answer_start < self.answer_guess_max

    def reserve_speculative(self, s: Session) -> bool:
        """Room for one speculative sentence (lock held): the session limit and the KV budget, never
        by evicting another session: speculation only uses room that is free."""
        if s.freed or s.length + s.reserved + 1 > self.max_sentences:
            return False
        if (self.sentences_in_use + 1) * self.per_sentence > self.kv_budget_bytes:
            return False
        if (self._usage(s.owner).sentences + 1) * self.per_sentence > self.owner_kv_budget_bytes:
            return False
        s.reserved += 1
        self._use(s, 1)
        return True

    def commit_speculative(self, s: Session, epoch: int, hidden: np.ndarray | None,
                           stop_logits: np.ndarray | None, decode_tokens: int = 0,
                           guess: list[int] | None = None) -> bool:
        """The batcher's speculative step for `s` is done (hidden None: it failed or was dropped). Kept
        only if nothing truncated the session since it was queued; its reservation is given back else."""
        with self.lock:
            s.speculating = False
            self.speculation_decode_tokens_total += decode_tokens
            if s.freed:
                return False
            s.reserved -= 1
            if hidden is None or epoch != s.epoch or not s.speculate:
                self._use(s, -1)
                s.kv.length = min(s.kv.length, s.length)
                self._give_back(s)
                return False
            s.answer_tokens[s.length] = guess  # the repetition controls of later guesses read it
            s.length += 1
            s.kv.length = s.length
            s.spec.append((hidden, stop_logits))
            s.tail = (hidden, stop_logits)
            self.speculative_steps_total += 1
            self._touch(s)
            return True

    # -- freeing ---------------------------------------------------------------------------
    def free(self, s: Session, reason: str, evicted: bool = False) -> None:
        with self.lock:
            if s.freed:
                return
            s.freed, s.free_reason = True, reason
            if self.sessions.get(s.key) is s:
                del self.sessions[s.key]
            self._use(s, -(s.length + s.reserved))
            usage = self._usage(s.owner)
            usage.sessions -= 1
            if not usage.sessions and not usage.sentences:
                del self.owners[s.owner]  # its refusals are forgotten with it: metrics count live owners
            s.kv, s.on_speculative, s.speculate = None, None, 0
            self.gone[s.key] = reason
            while len(self.gone) > REMEMBER_GONE:
                self.gone.popitem(last=False)
        if evicted:
            self.metrics.session_evicted()
        log("session_free", session=s.tag, reason=reason, length=s.length, steps=s.steps,
            age_s=round(time.monotonic() - s.created, 3))

    def _usage(self, owner: str) -> OwnerUsage:
        usage = self.owners.get(owner)
        if usage is None:
            usage = self.owners[owner] = OwnerUsage()
        return usage

    def _use(self, s: Session, n: int) -> None:
        """`n` more (or fewer) sentences held or reserved by `s` (lock held): the budget and its owner's quota."""
        self.sentences_in_use += n
        self._usage(s.owner).sentences += n

    def _give_back(self, s: Session) -> None:
        """A slot that no step uses keeps the pages of its sentences and gives back the rest (lock held): so
        the memory held is what the KV budget counts, to a page a session. A slot in use keeps its pages
        until its step ends (this runs again then). A step its stream gave up on may still be running: it
        works on the buffer it found (opt_block.KVView), so the pages go back at once all the same."""
        if not s.reserved and not s.speculating and s.kv is not None:
            s.kv.shrink()

    def _evict_one(self, why: str, keep: Session | None = None, owner: str | None = None) -> bool:
        """Free the least recently active detached session (of `owner`, when given; lock held). False if
        there is none."""
        for s in self.sessions.values():
            if not s.attached and s is not keep and not s.reserved and (owner is None or s.owner == owner):
                self.free(s, f"evicted {why}", evicted=True)
                return True
        return False

    def reap(self) -> int:
        """Free sessions idle longer than the idle timeout; end their streams if attached."""
        now = time.monotonic()
        ended = []
        with self.lock:
            idle = [s for s in self.sessions.values()
                    if now - s.last_active > self.idle_timeout_s and not s.reserved]
            for s in idle:
                if s.attached and s.end_stream is not None:
                    ended.append((s, s.end_stream))
                self.free(s, f"expired: idle for more than {self.idle_timeout_s:g} s", evicted=True)
        for s, end_stream in ended:  # outside the lock: ending a stream runs grpc callbacks
            end_stream(ServiceError(pb.SESSION_IDLE, f"this session was idle for more than {self.idle_timeout_s:g} s "
                                                     "and has been freed"))
        return len(idle)

    def free_all(self, reason: str) -> None:
        with self.lock:
            for s in list(self.sessions.values()):
                self.free(s, reason)

    def stats(self) -> dict:
        with self.lock:
            held = list(self.sessions.values())
            return {"sessions": len(held), "attached_sessions": sum(s.attached for s in held),
                    "kv_bytes": sum(s.kv_bytes for s in held), "kv_budget_bytes": self.kv_budget_bytes}

    def owner_stats(self, tag: Callable[[str], str]) -> dict[str, dict]:
        """Per owner (under `tag`, a keyed hash: never the owner key itself): sessions, KV bytes, refusals,
        guessing time."""
        with self.lock:
            return {tag(o): {"sessions": u.sessions, "kv_bytes": u.sentences * self.per_sentence,
                             "quota_refused_total": u.refused_total, "guess_seconds_total": u.guess_seconds}
                    for o, u in self.owners.items()}

    def count_guessing(self, seconds_by_owner: dict[str, float]) -> None:
        """Model-thread seconds just spent guessing for each owner (its metric)."""
        with self.lock:
            for owner, seconds in seconds_by_owner.items():
                self._usage(owner).guess_seconds += seconds

    def speculation_stats(self) -> dict:
        with self.lock:
            return {"speculative_steps_total": self.speculative_steps_total,
                    "speculation_accepted_total": self.speculation_accepted_total,
                    "speculation_dropped_total": self.speculation_dropped_total,
                    "speculation_decode_tokens_total": self.speculation_decode_tokens_total,
                    "speculation_stopped_total": self.speculation_stopped_total}

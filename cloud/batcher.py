"""The model thread: takes the pending steps of all sessions and runs them as batches.

Streams put a Job on the queue and wait. The batcher takes what is pending (up to
max_batch; with batch_wait_ms > 0 it waits that long for more after the first), drops jobs
whose stream has ended, and runs single-sentence steps and multi-sentence prefills as
separate forward passes (so one long prompt does not pad every step). With max_batch 1,
each forward pass runs one job: the same path with batch size 1 (no batching).

A forward pass that raises is retried job by job, so one bad job fails alone; a job whose
output is not finite fails with INVALID_ARGUMENT and leaves its session unchanged.

Speculation (issue 17): `speculate(session)` queues a SpecJob for a session that may run ahead (its
stream asked, fewer than N unconfirmed sentences, stop flag off, room left). The batcher decodes the h_t
of all pending SpecJobs in one greedy batch with the edge bundle's ONNX graphs (`GuessCodec`: the
sentences the edge decodes, token for token), re-encodes the sentences in one encoder call, and runs
them in one forward pass; a kept result goes to the session's stream (`Session.on_speculative`) and
queues the next. So N speculating sessions cost batched passes, not N serial ones. Guessing is the
cloud's own initiative, so it comes last and is shared: the edges' own steps run first, also between the
tokens of a guessing pass, and a pass takes the guesses of the callers that have had the least guessing
time (`GuessShares`), yielding to one that falls a quantum behind. A session that may not speculate now
gets a "declined" notice once per position, so its edge never waits for a guess that will not come.

If the thread dies (an exception outside the per-job handling) or the device reports an error
that poisons it for good (torch.AcceleratorError: a CUDA error), the batcher is *dead*: every
queued and running job fails with UNAVAILABLE at once, later submits too, and `on_death` tells
the server (which then reports NOT_SERVING).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import grpc
import numpy as np
import torch

from sllm.cloud.engine import Engine, StepOutput, stop_flag, stop_probability
from sllm.cloud.errors import ServiceError, invalid
from sllm.cloud.guess_shares import GuessShares
from sllm.cloud.guesses import GuessCodec
from sllm.cloud.jsonlog import log
from sllm.cloud.metrics import Metrics
from sllm.cloud.sessions import Session, SessionStore
from sllm.protos.v1 import sllm_pb2 as pb
from sllm.sentences.sampling import AnswerOptions


@dataclass(eq=False)
class Job:
    session: Session
    vectors: np.ndarray  # [T, d] float32
    done: threading.Event = field(default_factory=threading.Event)
    output: StepOutput | None = None
    error: ServiceError | None = None
    cancelled: bool = False  # its stream ended: skip it
    enqueued: float = field(default_factory=time.monotonic)
    on_done: Callable[[], None] | None = None  # called once, in the thread that finishes the job
    start: int = -1  # the session's length when it was queued: where its keys/values go (-1: the slot's)

    def finish(self, output: StepOutput | None = None, error: ServiceError | None = None) -> None:
        if self.done.is_set():
            return
        self.output, self.error = output, error
        self.done.set()
        if self.on_done is not None:
            self.on_done()


@dataclass(eq=False)
class SpecJob(Job):
    """A speculative step: decode `hidden` (the session's last h_t), re-encode it, step it at `start`."""

    hidden: np.ndarray | None = None  # [d]
    epoch: int = 0
    tokens: int = 0  # decoded tokens (the extra cloud compute speculation costs)
    controls: AnswerOptions | None = None  # how the turn's answer is decoded (None: plain greedy)
    history: list | None = None  # the answer's earlier sentences (token lists), for the repetition controls
    guess: list[int] | None = None  # the decoded sentence


def answer_history(s: Session) -> list[list[int]] | None:
    """The earlier sentences of the answer the next guess continues, as the edge's repetition controls
    see them (store lock held); None: do not guess (a sampled turn, or one of those sentences is the
    edge's own, whose tokens the cloud never saw)."""
    if not s.guess:
        return None
    if s.decoding is None or not s.decoding.controls_repetition:
        return []  # nothing reads the earlier sentences
    history = [s.answer_tokens.get(p) for p in range(s.answer_start, s.length)]
    return None if any(t is None for t in history) else history


def edge_stops(s: Session, stop_logits: np.ndarray) -> bool:
    """Does the edge end the answer at the session's next sentence (its stop rule on these outputs; an old
    client's: the termination head's argmax)?"""
    if s.decoding is None:
        return stop_flag(stop_logits)
    return s.decoding.ends(s.length - s.answer_start, stop_flag(stop_logits), stop_probability(stop_logits))


def dead_error() -> ServiceError:
    return ServiceError(pb.MODEL_STOPPED, "the model thread of this server has stopped; it reports NOT_SERVING: "
                        "reconnect (to another replica) and rebuild the session from its history")


def shutting_down(message: str = "the server is shutting down") -> ServiceError:
    return ServiceError(pb.SHUTTING_DOWN, message)


class Batcher:
    def __init__(self, engine: Engine, metrics: Metrics, *, max_batch: int = 64,
                 batch_wait_ms: float = 0.0, log_steps: bool = False, on_death: Callable[[], None] | None = None,
                 store: SessionStore | None = None, codec: GuessCodec | None = None):
        self.engine = engine
        self.store = store  # speculation: where speculative steps are committed
        self.codec = codec  # speculation: the edge's graphs the guesses decode with (None: no speculation)
        self.metrics = metrics
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000
        self.log_steps = log_steps
        self.cond = threading.Condition()
        self.queue: deque[Job] = deque()
        self.stopping = False
        self.dead = False  # the thread died or the device failed for good: no job will run again
        self.on_death = on_death
        self.running: list[Job] = []  # the jobs taken from the queue and not finished (failed if the thread dies)
        self.guesses: list[SpecJob] = []  # guesses taken from the queue, waiting for a guessing pass
        self.shares = GuessShares()  # whose guesses run first
        self.thread = threading.Thread(target=self._main, name="sllm-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.dead

    def queue_depth(self) -> int:
        with self.cond:
            return len(self.queue)

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.dead:
                error = dead_error()
            elif self.stopping:
                error = shutting_down()
            else:
                self.queue.append(job)
                self.cond.notify()
                return
        job.finish(error=error)

    def stop(self, timeout: float = 10.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)
        with self.cond:
            waiting, self.guesses = list(self.queue) + self.guesses, []
            self.queue.clear()
        for j in waiting:
            j.finish(error=shutting_down())

    def _take(self, wait: bool = True) -> list[Job] | None:
        """The queued jobs (up to max_batch); with `wait`, blocks until there is one. None: stopping."""
        with self.cond:
            while wait and not self.queue and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return None
            if wait and self.batch_wait_s and len(self.queue) < self.max_batch:
                deadline = time.monotonic() + self.batch_wait_s
                while len(self.queue) < self.max_batch and not self.stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.cond.wait(left)
            n = min(self.max_batch, len(self.queue))
            jobs = [self.queue.popleft() for _ in range(n)]
            self.running.extend(jobs)
            return jobs

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException:  # noqa: BLE001 - whatever kills the thread, say so and fail the waiting jobs
            log("model_thread_died", logging.CRITICAL, exc_info=True)
            self._die()
            return
        if not self.stopping:  # the loop only returns when asked to stop
            self._die()

    def _die(self) -> None:
        with self.cond:
            self.dead = True
            jobs = list(self.queue) + self.running + self.guesses
            self.queue.clear()
            self.running, self.guesses = [], []
        for j in jobs:
            j.finish(error=dead_error())
        if self.on_death is not None:
            self.on_death()

    def _loop(self) -> None:
        while not self.dead:
            jobs = self._take(wait=not self.guesses)
            if jobs is None:
                return
            self._serve(jobs)
            # one guessing pass per round even when steps keep coming (they run between its tokens):
            # a speculating edge waits for its guess, so guesses must never starve
            if self.guesses and not self.dead:
                self._guess_pass(yields=True)
            if self.dead:
                return  # _die fails what is still running
            with self.cond:
                self.running = []

    def _serve(self, jobs: list[Job]) -> None:
        """Run the edges' own steps of `jobs` now, single-sentence steps and prefills in passes of their
        own; their guesses wait in `guesses` for a guessing pass."""
        live = []
        for j in jobs:
            if j.cancelled:
                j.finish(error=ServiceError(pb.STREAM_ENDED, "the stream ended"))
            else:
                live.append(j)
        steps = [j for j in live if not isinstance(j, SpecJob) and len(j.vectors) == 1]
        prefills = [j for j in live if not isinstance(j, SpecJob) and len(j.vectors) > 1]
        for group in (steps, prefills):
            if group and not self.dead:
                self._run(group)
        self.guesses.extend(j for j in live if isinstance(j, SpecJob))

    # -- speculation ---------------------------------------------------------------------------
    def speculate(self, s: Session) -> None:
        """Queue `s`'s next speculative step if it may take one (any thread); when it may not (stop flag,
        limits, an empty guess) tell its stream once for this position; at N ahead, wait for an Accept."""
        store = self.store
        if self.codec is None or store is None:
            return
        with store.lock:
            if (s.freed or not s.speculate or s.speculating or s.reserved or s.on_speculative is None
                    or s.tail is None):  # reserved: a step of the edge's is on its way; its reply goes first
                return
            if s.length - s.confirmed >= s.speculate:
                return  # N ahead: the next Accept (or Append) moves on
            hidden, stop_logits = s.tail
            history = answer_history(s)
            if (hidden is not None and not edge_stops(s, stop_logits) and history is not None
                    and store.may_guess(s) and store.reserve_speculative(s)):
                s.speculating = True
                job = SpecJob(s, np.zeros((0, 0), np.float32), hidden=hidden, epoch=s.epoch, start=s.length,
                              controls=s.decoding, history=history)
            else:
                job = None
                if s.declined_at == (s.epoch, s.length):
                    return
                s.declined_at = (s.epoch, s.length)
            sink, epoch, length = s.on_speculative, s.epoch, s.length
        if job is None:
            sink(epoch, length + 1, None, None)
        else:
            self.submit(job)
            if job.error is not None:  # refused (stopping, dead): give the room back
                store.commit_speculative(s, job.epoch, None, None)

    def _guess_pass(self, yields: bool) -> None:
        """One guessing pass: the waiting guesses of the least-served owners (`GuessShares`) decoded as one
        batch, re-encoded and stepped. With `yields`, between its tokens the pass serves the edges' steps
        that came in, and the guesses of an owner that has fallen a quantum behind it (a pass of their own
        that does not yield): a step waits for one token of guessing, a light caller's guess for about a
        quantum, however long the batch in progress."""
        shares = self.shares
        leaders = shares.leaders({j.session.owner for j in self.guesses})
        jobs = [j for j in self.guesses if j.session.owner in leaders][:self.max_batch]
        taken = set(jobs)  # by identity (eq=False)
        self.guesses = [j for j in self.guesses if j not in taken]
        start, t0, yielded = shares.begin(leaders), time.perf_counter(), 0.0  # yielded: seconds of others' work

        def behind(elapsed: float) -> bool:  # has a waiting caller outside this pass fallen a quantum behind it?
            return any(j.session.owner not in leaders and shares.behind(j.session.owner, start, elapsed)
                       for j in self.guesses)

        failure: BaseException | None = None

        def between() -> None:  # after each token of this pass
            nonlocal yielded, failure
            if not self.queue and not behind(time.perf_counter() - t0 - yielded):
                return
            t = time.perf_counter()
            try:
                jobs = self._take(wait=False)
                if jobs:
                    self._serve(jobs)
                if behind(t - t0 - yielded) and not self.dead:
                    self._guess_pass(yields=False)
            except BaseException as e:  # not the guess's failure: re-raised below, as the loop's own would be
                failure = e
                raise
            yielded += time.perf_counter() - t

        specs = self._prepare_speculation(jobs, between if yields else None)
        if failure is not None:
            raise failure
        specs = [j for j in specs if self._current(j)]  # a step served between tokens may have rolled it back
        if specs and not self.dead:
            self._run(specs)
        tokens: dict[str, int] = {}
        for j in jobs:
            tokens[j.session.owner] = tokens.get(j.session.owner, 0) + j.tokens
        self.store.count_guessing(shares.charge(tokens, time.perf_counter() - t0 - yielded))

    def _prepare_speculation(self, jobs: list[SpecJob], between=None) -> list[SpecJob]:
        """Decode the pending guesses in one batch (`between` runs between its tokens) and re-encode them;
        the jobs left to step."""
        jobs = [j for j in jobs if self._current(j)]
        if not jobs:
            return []
        codec = self.codec
        # h_t as the edge receives it (its client asks replies in the dtype of its own vectors), so the guess
        # decodes what the edge decodes
        hidden = np.stack([np.asarray(j.hidden, j.session.spec_dtype).astype(np.float32) for j in jobs])
        try:
            tokens = codec.decode(hidden, [j.controls for j in jobs], [j.history for j in jobs], between)
            ready = [(j, t) for j, t in zip(jobs, tokens) if t]
            vectors = codec.encode([t for _, t in ready]) if ready else None
        except Exception:  # noqa: BLE001 - speculation is optional: its failure declines, nothing else
            log("speculation_failed", logging.ERROR, exc_info=True)
            for j in jobs:
                self._spec_done(j, None)
            return []
        for j, t in zip(jobs, tokens):
            j.tokens, j.guess = len(t) + 1, t  # + eos
            if not t:  # eos straight away: the edge's answer ends here too
                self._spec_done(j, None)
        out = []
        for i, (j, _) in enumerate(ready):
            # rounded as the edge's own vector is on the wire, so an accepted guess feeds the model what the
            # edge's Append would have
            j.vectors = vectors[i:i + 1].astype(j.session.spec_dtype).astype(np.float32)
            out.append(j)
        return out

    def _current(self, j: SpecJob) -> bool:
        """Still wanted (nothing truncated the session since it was queued); finishes it if not."""
        s = j.session
        if s.freed or s.kv is None or j.epoch != s.epoch or not s.speculate:
            self._spec_done(j, None)
            return False
        return True

    def _spec_done(self, j: SpecJob, out: StepOutput | None) -> None:
        """Commit a speculative step (or give its room back), send it to the stream, queue the next."""
        s = j.session
        kept = self.store.commit_speculative(s, j.epoch, None if out is None else out.hidden,
                                             None if out is None else out.stop_logits, j.tokens, j.guess)
        j.finish(out)
        if kept:
            sink = s.on_speculative
            if sink is not None:
                sink(j.epoch, j.start + 1, out, j.vectors[0])
        elif out is None and not s.freed and j.epoch == s.epoch and s.speculate:
            with self.store.lock:  # the guess came back empty or failed: decline this position
                s.declined_at = (s.epoch, s.length)
                sink, length = s.on_speculative, s.length
            if sink is not None:
                sink(j.epoch, length + 1, None, None)
            return
        self.speculate(s)

    def _run(self, jobs: list[Job]) -> None:
        for j in jobs:  # where each job's keys/values go (a rollback since it was queued moved the end)
            if j.start >= 0 and j.session.kv is not None:
                j.session.kv.length = j.start
        slots = [j.session.kv for j in jobs]
        if any(slot is None for slot in slots):  # freed since it was queued (shutdown): nobody waits for it
            for j, slot in zip(jobs, slots):
                if slot is None:
                    j.finish(error=shutting_down("this session was freed before its step ran"))
            jobs = [j for j, slot in zip(jobs, slots) if slot is not None]
            slots = [slot for slot in slots if slot is not None]
            if not jobs:
                return
        t0 = time.perf_counter()
        try:
            outs = self.engine.forward(slots, [j.vectors for j in jobs])
        except Exception as e:  # noqa: BLE001 - one failing job must not take the others down
            if isinstance(e, torch.AcceleratorError):  # the device context is broken: nothing will run again
                log("device_failed", logging.CRITICAL, exc_info=True)
                self.dead = True
                return
            if len(jobs) > 1:
                for j in jobs:
                    self._run([j])
                return
            log("forward_failed", logging.ERROR, exc_info=True, session=jobs[0].session.tag)
            if isinstance(jobs[0], SpecJob):
                self._spec_done(jobs[0], None)
                return
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if "out of memory" in str(e).lower() else grpc.StatusCode.INTERNAL
            jobs[0].finish(error=ServiceError(pb.MODEL_FAILED, f"the model failed on this step ({type(e).__name__}); "
                                              "the session is unchanged", code))
            return
        self.metrics.forward_pass(len(jobs), sum(len(j.vectors) for j in jobs))
        if self.log_steps:
            log("forward", logging.DEBUG, batch=len(jobs), sentences=sum(len(j.vectors) for j in jobs),
                ms=round(1000 * (time.perf_counter() - t0), 3))
        for j, out in zip(jobs, outs):
            if isinstance(j, SpecJob):
                self._spec_done(j, out if out.finite else None)
            elif out.finite:
                j.finish(out)
            else:
                j.finish(error=invalid("the model's output is not finite for these vectors (values too large?); "
                                       "the session is unchanged"))

"""The model thread: takes the pending steps of all sessions and runs them as batches.

Streams put a Job on the queue and wait. The batcher takes what is pending (up to
max_batch; with batch_wait_ms > 0 it waits that long for more after the first), drops jobs
whose stream has ended, and runs single-sentence steps and multi-sentence prefills as
separate forward passes (so one long prompt does not pad every step). With batching off,
each forward pass runs one job: the same path with batch size 1.

A forward pass that raises is retried job by job, so one bad job fails alone; a job whose
output is not finite fails with INVALID_ARGUMENT and leaves its session unchanged.

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

from cloud.engine import Engine, StepOutput
from cloud.errors import ServiceError, invalid, unavailable
from cloud.jsonlog import log
from cloud.metrics import Metrics
from cloud.sessions import Session


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

    def finish(self, output: StepOutput | None = None, error: ServiceError | None = None) -> None:
        if self.done.is_set():
            return
        self.output, self.error = output, error
        self.done.set()
        if self.on_done is not None:
            self.on_done()


def dead_error() -> ServiceError:
    return unavailable("the model thread of this server has stopped; it reports NOT_SERVING: reconnect (to "
                       "another replica) and rebuild the session from its history")


class Batcher:
    def __init__(self, engine: Engine, metrics: Metrics, *, batching: bool = True, max_batch: int = 64,
                 batch_wait_ms: float = 0.0, log_steps: bool = False, on_death: Callable[[], None] | None = None):
        self.engine = engine
        self.metrics = metrics
        self.batching = batching
        self.max_batch = max_batch if batching else 1
        self.batch_wait_s = batch_wait_ms / 1000 if batching else 0.0
        self.log_steps = log_steps
        self.cond = threading.Condition()
        self.queue: deque[Job] = deque()
        self.stopping = False
        self.dead = False  # the thread died or the device failed for good: no job will run again
        self.on_death = on_death
        self.running: list[Job] = []  # the jobs of the forward pass in progress
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
                error = unavailable("the server is shutting down")
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
            while self.queue:
                self.queue.popleft().finish(error=unavailable("the server is shutting down"))

    def _take(self) -> list[Job] | None:
        with self.cond:
            while not self.queue and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return None
            if self.batch_wait_s and len(self.queue) < self.max_batch:
                deadline = time.monotonic() + self.batch_wait_s
                while len(self.queue) < self.max_batch and not self.stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.cond.wait(left)
            n = min(self.max_batch, len(self.queue))
            return [self.queue.popleft() for _ in range(n)]

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
            jobs = list(self.queue) + self.running
            self.queue.clear()
            self.running = []
        for j in jobs:
            j.finish(error=dead_error())
        if self.on_death is not None:
            self.on_death()

    def _loop(self) -> None:
        while not self.dead:
            jobs = self._take()
            if jobs is None:
                return
            with self.cond:
                self.running = jobs
            live = []
            for j in jobs:
                if j.cancelled:
                    j.finish(error=ServiceError(grpc.StatusCode.CANCELLED, "the stream ended"))
                else:
                    live.append(j)
            steps = [j for j in live if len(j.vectors) == 1]
            prefills = [j for j in live if len(j.vectors) > 1]
            for group in (steps, prefills):
                if group and not self.dead:
                    self._run(group)
            if self.dead:
                return  # _die fails what is still running
            with self.cond:
                self.running = []

    def _run(self, jobs: list[Job]) -> None:
        slots = [j.session.kv for j in jobs]
        if any(slot is None for slot in slots):  # freed since it was queued (shutdown): nobody waits for it
            for j, slot in zip(jobs, slots):
                if slot is None:
                    j.finish(error=unavailable("this session was freed before its step ran"))
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
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if "out of memory" in str(e).lower() else grpc.StatusCode.INTERNAL
            jobs[0].finish(error=ServiceError(code, f"the model failed on this step ({type(e).__name__}); "
                                                    "the session is unchanged"))
            return
        self.metrics.forward_pass(len(jobs), sum(len(j.vectors) for j in jobs))
        if self.log_steps:
            log("forward", logging.DEBUG, batch=len(jobs), sentences=sum(len(j.vectors) for j in jobs),
                ms=round(1000 * (time.perf_counter() - t0), 3))
        for j, out in zip(jobs, outs):
            if out.finite:
                j.finish(out)
            else:
                j.finish(error=invalid("the model's output is not finite for these vectors (values too large?); "
                                       "the session is unchanged"))

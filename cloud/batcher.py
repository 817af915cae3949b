"""The model thread: takes the pending steps of all sessions and runs them as batches.

Streams put a Job on the queue and wait. The batcher takes what is pending (up to
max_batch; with batch_wait_ms > 0 it waits that long for more after the first), drops jobs
whose stream has ended, and runs single-sentence steps and multi-sentence prefills as
separate forward passes (so one long prompt does not pad every step). With batching off,
each forward pass runs one job: the same path with batch size 1.

A forward pass that raises is retried job by job, so one bad job fails alone; a job whose
output is not finite fails with INVALID_ARGUMENT and leaves its session unchanged.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import grpc
import numpy as np

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

    def finish(self, output: StepOutput | None = None, error: ServiceError | None = None) -> None:
        self.output, self.error = output, error
        self.done.set()


class Batcher:
    def __init__(self, engine: Engine, metrics: Metrics, *, batching: bool = True, max_batch: int = 64,
                 batch_wait_ms: float = 0.0, log_steps: bool = False):
        self.engine = engine
        self.metrics = metrics
        self.batching = batching
        self.max_batch = max_batch if batching else 1
        self.batch_wait_s = batch_wait_ms / 1000 if batching else 0.0
        self.log_steps = log_steps
        self.cond = threading.Condition()
        self.queue: deque[Job] = deque()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="sllm-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def queue_depth(self) -> int:
        with self.cond:
            return len(self.queue)

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                job.finish(error=unavailable("the server is shutting down"))
                return
            self.queue.append(job)
            self.cond.notify()

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

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            live = []
            for j in jobs:
                if j.cancelled:
                    j.finish(error=ServiceError(grpc.StatusCode.CANCELLED, "the stream ended"))
                else:
                    live.append(j)
            steps = [j for j in live if len(j.vectors) == 1]
            prefills = [j for j in live if len(j.vectors) > 1]
            for group in (steps, prefills):
                if group:
                    self._run(group)

    def _run(self, jobs: list[Job]) -> None:
        t0 = time.perf_counter()
        try:
            outs = self.engine.forward([j.session.kv for j in jobs], [j.vectors for j in jobs])
        except Exception as e:  # noqa: BLE001 - one failing job must not take the others down
            if len(jobs) > 1:
                for j in jobs:
                    self._run([j])
                return
            log("forward_failed", logging.ERROR, exc_info=True, session=jobs[0].session.id)
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

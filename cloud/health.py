"""grpc.health.v1.Health that no caller can turn into a lockout: it needs no token (load balancers
and orchestrators probe it), so every Watch stream is bounded: a service name of at most
MAX_SERVICE_NAME bytes, at most `max_watches` streams in all and `per_peer` per peer address (a new
one ends the oldest of the peer with the most, so a prober that re-watches always gets in), and a
lifetime after which the stream ends with OK and the client watches again. Check is a unary call: it
holds nothing. Must never block on anything but its own streams (event-loop thread only)."""
from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sllm.cloud.errors import ServiceError, abort, invalid
from sllm.protos.v1 import sllm_pb2 as pb

MAX_SERVICE_NAME = 200  # bytes; real service names are a few dozen
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def peer_host(peer: str) -> str:
    """'ipv4:127.0.0.1:5000' -> 'ipv4:127.0.0.1' (the address, whatever the port)."""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class _Watch:
    def __init__(self, peer: str):
        self.peer = peer
        self.changed = asyncio.Event()  # the status may have changed
        self.gone = asyncio.Event()  # ended for room
        self.ended: str | None = None  # why it was ended early (RESOURCE_EXHAUSTED)


class BoundedHealth(health_pb2_grpc.HealthServicer):
    def __init__(self, *, max_watches: int = 32, per_peer: int = 4, lifetime_s: float = 60.0):
        self.max_watches, self.per_peer, self.lifetime_s = max_watches, per_peer, lifetime_s
        self.status: dict[str, int] = {}
        self.watches: OrderedDict[_Watch, None] = OrderedDict()  # oldest first
        self.by_peer: Counter[str] = Counter()
        self.ended_total = 0  # streams ended early for room (metrics)
        self.shutting_down = False

    async def set(self, service: str, status: int) -> None:
        if self.shutting_down:
            return
        self.status[service] = status
        for w in self.watches:
            w.changed.set()

    async def enter_graceful_shutdown(self) -> None:
        for name in self.status:
            await self.set(name, NOT_SERVING)
        self.shutting_down = True

    def _check_name(self, service: str) -> str | None:
        if len(service.encode()) > MAX_SERVICE_NAME:
            return f"the service name is longer than {MAX_SERVICE_NAME} bytes"
        return None

    async def Check(self, request, context):  # noqa: N802
        problem = self._check_name(request.service)
        if problem:
            await abort(context, invalid(problem))
        if request.service not in self.status:  # the health protocol's answer: NOT_FOUND
            await abort(context, ServiceError(pb.BAD_REQUEST, "unknown service", grpc.StatusCode.NOT_FOUND))
        return health_pb2.HealthCheckResponse(status=self.status[request.service])

    def _enter(self, w: _Watch) -> None:
        while self.by_peer[w.peer] >= self.per_peer or len(self.watches) >= self.max_watches:
            greediest = w.peer if self.by_peer[w.peer] >= self.per_peer else max(self.by_peer, key=self.by_peer.get)
            oldest = next(x for x in self.watches if x.peer == greediest)
            self._leave(oldest)
            self.ended_total += 1
            oldest.ended = (f"more than {self.per_peer} Watch streams from this address, or {self.max_watches} in "
                            "all: the oldest of the address with the most was ended; watch again")
            oldest.gone.set()
        self.watches[w] = None
        self.by_peer[w.peer] += 1

    def _leave(self, w: _Watch) -> None:
        if self.watches.pop(w, False) is None:
            self.by_peer[w.peer] -= 1
            if not self.by_peer[w.peer]:
                del self.by_peer[w.peer]

    async def Watch(self, request, context):  # noqa: N802
        problem = self._check_name(request.service)
        if problem:
            await abort(context, invalid(problem))
        w = _Watch(peer_host(context.peer()))
        self._enter(w)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lifetime_s
        try:
            last = None
            while not w.ended:
                status = self.status.get(request.service, UNKNOWN)
                w.changed.clear()
                # a write (a client that does not read) and the wait for a change both end with the
                # lifetime or an eviction: no Watch outlives them
                step = (context.write(health_pb2.HealthCheckResponse(status=status)) if status != last
                        else w.changed.wait())
                last = status
                if not await _until(step, w, deadline - loop.time()):
                    return  # OK: the lifetime is over; the client watches again
            await abort(context, ServiceError(pb.SERVER_FULL, w.ended))
        finally:
            self._leave(w)


async def _until(coro, w: _Watch, timeout: float) -> bool:
    """Run `coro` until it is done (True), `w` is ended (True: the caller sees w.ended) or `timeout` (False)."""
    task = asyncio.ensure_future(coro)
    ended = asyncio.ensure_future(w.gone.wait())
    try:
        done, _ = await asyncio.wait((task, ended), timeout=max(0.0, timeout), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, ended):
            if not t.done():
                t.cancel()
    if task in done:
        task.result()
    return bool(done)

"""A TCP relay on 127.0.0.1 that delays every byte by a fixed one-way time in each direction: a
network round trip of RTT = 2 x one_way_s on loopback (kernel netem is not available here).

    with Relay("127.0.0.1:50051", one_way_s=0.025) as relay:   # RTT 50 ms
        client connects to relay.address

    python bench/relay.py                      # its own added latency at 0 ms (a ping-pong, direct vs relayed)
    python bench/relay.py --upstream HOST:PORT --rtt-ms 50 --port 7000    # serve until Ctrl-C

Each direction of a connection is a reader thread that stamps every chunk with the time it came
in and a sender thread that sends the chunks in order (one FIFO per direction), each once its
stamp + one_way_s has passed: time.sleep, whose wake-up is late by ~0.06 ms here. (An asyncio loop
was tried first: its timers wake in whole milliseconds, as epoll rounds timeouts up, which made
every delivery ~0.8 ms late at the median and 2 ms at p90 on this loaded 2-core machine.) With 0
delay a chunk is sent as soon as it is read. `stats()` gives the delay each direction actually
applied (mean, max), so a report can show the RTT it really got; `measure_overhead` gives what
the relay itself adds to a round trip.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Self

from sllm.runtime.procs import stop_process, with_parent_death_signal

CHUNK = 1 << 16
SPIN_S = 0.0003  # time.sleep wakes ~0.1 ms late (more on a loaded machine): spin the last stretch


@dataclass
class Direction:
    """What one direction of all connections carried, and the delay it actually applied."""
    chunks: int = 0
    bytes: int = 0
    delay_sum_s: float = 0.0
    delay_max_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int, delay_s: float) -> None:
        with self.lock:  # one Direction counts every connection's chunks
            self.chunks += 1
            self.bytes += nbytes
            self.delay_sum_s += delay_s
            self.delay_max_s = max(self.delay_max_s, delay_s)

    @property
    def delay_mean_s(self) -> float:
        return self.delay_sum_s / self.chunks if self.chunks else 0.0


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


class Relay:
    def __init__(self, upstream: str, one_way_s: float = 0.0, port: int = 0):
        if one_way_s < 0:
            raise ValueError("the delay must be >= 0")
        self.upstream = _host_port(upstream)
        self.one_way_s = one_way_s
        self.up, self.down = Direction(), Direction()  # client -> upstream, upstream -> client
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Relay:
        self._thread("accept", self._accept)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every connection, then join every thread."""
        with self._lock:
            self._stopping = True
            sockets = [self._listener, *self._sockets]
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept/recv/send
            s.close()
        for t in list(self._threads):
            t.join(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self) -> dict:
        """Chunks, bytes and the one-way delay actually applied, per direction, plus the RTT they make."""
        out = {name: {"chunks": d.chunks, "bytes": d.bytes, "delay_mean_ms": d.delay_mean_s * 1e3,
                      "delay_max_ms": d.delay_max_s * 1e3} for name, d in (("up", self.up), ("down", self.down))}
        out["rtt_target_ms"] = 2e3 * self.one_way_s
        out["rtt_applied_ms"] = out["up"]["delay_mean_ms"] + out["down"]["delay_mean_ms"]
        return out

    # ------------------------------------------------------------ threads

    def _thread(self, name: str, target, *args) -> None:
        t = threading.Thread(target=target, args=args, name=f"relay-{self.port}-{name}", daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _track(self, s: socket.socket) -> bool:
        """Register a connection's socket for stop(); False (and closed) when stopping already."""
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if not self._stopping:
                self._sockets.add(s)
                return True
        s.close()
        return False

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener is closed: stop()
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            if not (self._track(client) and self._track(upstream)):
                continue
            left = [4]  # threads of this connection still running: the last one closes its sockets

            def done(pair=(client, upstream), left=left) -> None:
                with self._lock:
                    left[0] -= 1
                    if left[0]:
                        return
                    self._sockets.difference_update(pair)
                for s in pair:
                    s.close()

            for src, dst, stats, name in ((client, upstream, self.up, "up"), (upstream, client, self.down, "down")):
                queue: SimpleQueue = SimpleQueue()
                self._thread(f"{name}-read", self._read, src, queue, done)
                self._thread(f"{name}-send", self._send, queue, dst, stats, done)

    @staticmethod
    def _read(src: socket.socket, queue: SimpleQueue, done) -> None:
        """Stamp every chunk with the time it came in; None at EOF or error."""
        try:
            while data := src.recv(CHUNK):
                queue.put((time.perf_counter(), data))
        except OSError:
            pass
        queue.put(None)
        done()

    def _send(self, queue: SimpleQueue, dst: socket.socket, stats: Direction, done) -> None:
        """Send each chunk one_way_s after it came in, in order; pass the EOF on."""
        try:
            while (item := queue.get()) is not None:
                came, data = item
                due = came + self.one_way_s
                wait = due - time.perf_counter() - SPIN_S  # read the clock once: it moves between two reads
                if wait > 0:
                    time.sleep(wait)
                while time.perf_counter() < due:  # the last SPIN_S: a sleep's wake-up would be late
                    pass
                # counted before it leaves: a reader that has the bytes then sees them in stats() too
                stats.add(len(data), time.perf_counter() - came)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        done()


class RelayProcess:
    """The same relay in a process of its own, so that it shares no GIL with the client whose
    traffic it delays: `python -m bench.relay --control`, driven over its stdin/stdout (a line
    "stats" -> one JSON line of Relay.stats(); end of stdin -> it stops and exits). Same interface
    as Relay: start(), address, stats(), stop(), a context manager."""

    def __init__(self, upstream: str, one_way_s: float = 0.0, port: int = 0):
        if one_way_s < 0:
            raise ValueError("the delay must be >= 0")
        self.command = [sys.executable, "-m", "bench.relay", "--upstream", upstream, "--rtt-ms",
                        repr(2e3 * one_way_s), "--port", str(port), "--control"]
        self.one_way_s = one_way_s
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def start(self) -> RelayProcess:
        self.proc = subprocess.Popen(with_parent_death_signal(self.command), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the relay process did not start (exit code {self.proc.wait()})")
        self.address = json.loads(line)["address"]
        return self

    def stats(self) -> dict:
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # its cue to stop
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc, timeout)
        self.proc.stdout.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- its own cost at 0 ms

class EchoServer:
    """A blocking TCP echo server, a thread per connection (the far end of the overhead ping-pong)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, name="relay-echo", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._echo, args=(conn,), name="relay-echo-conn", daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(CHUNK):
                conn.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def _ping_pong(address: str, rounds: int, size: int) -> list[float]:
    """Round-trip times (s) of `rounds` messages of `size` bytes to an echo at `address`."""
    payload = b"x" * size
    times = []
    with socket.create_connection(_host_port(address)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(rounds):
            t0 = time.perf_counter()
            s.sendall(payload)
            got = 0
            while got < size:
                chunk = s.recv(CHUNK)
                if not chunk:
                    raise ConnectionError("the echo closed the connection")
                got += len(chunk)
            times.append(time.perf_counter() - t0)
    return times


def measure_overhead(rounds: int = 300, size: int = 600, one_way_s: float = 0.0, factory=RelayProcess) -> dict:
    """What the relay (`factory`: RelayProcess or Relay) adds to a round trip at `one_way_s` (0: its
    own cost): median and p90 of a ping-pong of `size`-byte messages (about one float16 SLLM step at
    d=256) through the relay minus the same ping-pong straight to the echo, in alternating blocks."""
    echo = EchoServer()
    direct, relayed = [], []
    try:
        with factory(echo.address, one_way_s) as relay:
            for _ in range(5):
                direct += _ping_pong(echo.address, rounds // 5, size)
                relayed += _ping_pong(relay.address, rounds // 5, size)
    finally:
        echo.close()
    d, r = (sorted(x) for x in (direct, relayed))

    def q(xs, f):
        return xs[min(len(xs) - 1, int(f * len(xs)))] * 1e3

    return {"rounds": len(d), "bytes": size, "one_way_ms": one_way_s * 1e3,
            "direct_median_ms": q(d, 0.5), "relayed_median_ms": q(r, 0.5),
            "added_median_ms": statistics.median(r) * 1e3 - statistics.median(d) * 1e3,
            "added_p90_ms": q(r, 0.9) - q(d, 0.9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", help="HOST:PORT to relay to; without it, measure the relay's own overhead")
    ap.add_argument("--rtt-ms", type=float, default=0.0, help="round trip added (half each way)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--control", action="store_true", help="(RelayProcess) address as a JSON line on stdout; "
                    "a line 'stats' on stdin -> a JSON line of stats; end of stdin -> stop")
    args = ap.parse_args()
    if args.upstream is None:
        for rtt in sorted({0.0, args.rtt_ms}):
            for factory in (Relay, RelayProcess):
                m = measure_overhead(args.rounds, one_way_s=rtt / 2e3, factory=factory)
                print(f"{factory.__name__:12s} RTT {rtt:g} ms: direct {m['direct_median_ms']:.3f} ms, relayed "
                      f"{m['relayed_median_ms']:.3f} ms (median of {m['rounds']} round trips of {m['bytes']} B): "
                      f"{m['added_median_ms'] * 1e3:.0f} us added (p90 {m['added_p90_ms'] * 1e3:.0f} us)")
        return
    relay = Relay(args.upstream, args.rtt_ms / 2e3, args.port).start()
    try:
        if args.control:
            print(json.dumps({"event": "server_start", "address": relay.address}), flush=True)
            for line in sys.stdin:
                if line.strip() == "stats":
                    print(json.dumps(relay.stats()), flush=True)
            return
        print(f"relaying {relay.address} -> {args.upstream} with RTT {args.rtt_ms:g} ms; Ctrl-C stops", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
        print(relay.stats())
    finally:
        relay.stop()


if __name__ == "__main__":
    main()

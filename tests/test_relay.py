"""The bench's delaying TCP relay (bench/relay.py): bytes pass unchanged and in order both ways,
the chosen delay is applied (checked loosely: at least the delay, no upper bound), and stopping
it leaves nothing running, in this process (Relay) or as a process of its own (RelayProcess)."""
import socket
import threading
import time

import numpy as np
import pytest

from bench.relay import EchoServer, Relay, RelayProcess


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "the connection closed early"
        out += chunk
    return bytes(out)


def _relay_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("relay-") and not t.name.startswith("relay-echo")]


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.mark.parametrize("factory", [Relay, RelayProcess])
def test_bytes_pass_unchanged_and_in_order_both_ways(echo, factory):
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in (1, 7, 600, 65536, 200_000, 3)]
    with factory(echo.address, 0.002) as relay:
        with _connect(relay.address) as a, _connect(relay.address) as b:  # two connections at once
            for piece in pieces:
                a.sendall(piece)
                b.sendall(piece[::-1])
            want = b"".join(pieces)
            assert _recv_exactly(a, len(want)) == want
            assert _recv_exactly(b, len(want)) == b"".join(p[::-1] for p in pieces)
        stats = relay.stats()
    assert stats["up"]["bytes"] == stats["down"]["bytes"] == 2 * len(want)


@pytest.mark.parametrize("factory", [Relay, RelayProcess])
def test_the_chosen_delay_is_applied(echo, factory):
    one_way = 0.03
    with factory(echo.address, one_way) as relay, _connect(relay.address) as s:
        for _ in range(3):
            t0 = time.perf_counter()
            s.sendall(b"ping")
            assert _recv_exactly(s, 4) == b"ping"
            assert time.perf_counter() - t0 >= 2 * one_way  # one delay each way
        stats = relay.stats()
    assert stats["up"]["delay_mean_ms"] >= one_way * 1e3 and stats["down"]["delay_mean_ms"] >= one_way * 1e3
    assert stats["rtt_target_ms"] == pytest.approx(60)


def test_stop_ends_every_thread_and_open_connection(echo):
    relay = Relay(echo.address, 0.01).start()
    s = _connect(relay.address)
    s.sendall(b"x")
    assert _recv_exactly(s, 1) == b"x"
    assert _relay_threads()  # accept + a reader and a sender per direction
    relay.stop()
    assert not _relay_threads()
    assert s.recv(1) == b""  # the open connection was closed
    s.close()
    with pytest.raises(OSError):
        _connect(relay.address).close()  # nothing listens any more


def test_relay_process_exits_when_stopped(echo):
    relay = RelayProcess(echo.address, 0.0).start()
    with _connect(relay.address) as s:
        s.sendall(b"hello")
        assert _recv_exactly(s, 5) == b"hello"
        relay.stop()
    assert relay.proc.returncode == 0


def test_a_negative_delay_is_refused():
    with pytest.raises(ValueError):
        Relay("127.0.0.1:1", -0.001)
    with pytest.raises(ValueError):
        RelayProcess("127.0.0.1:1", -0.001)


def test_a_chunk_whose_deadline_passes_while_it_waits_is_sent_at_once(echo, monkeypatch):
    """The clock moves on between two reads of it: the send thread must not ask time.sleep for a
    negative wait (a ValueError that killed the thread, and hung the bench that used the relay)."""
    import bench.relay as relay_module

    reads = iter([0.0, 0.0])  # the chunk comes in, the sender looks at the clock; every later read is past the deadline

    class Clock:
        @staticmethod
        def perf_counter() -> float:
            return next(reads, 0.02)

        @staticmethod
        def sleep(seconds: float) -> None:
            if seconds < 0:
                raise ValueError("sleep length must be non-negative")  # as time.sleep does

    relay = Relay(echo.address, one_way_s=0.01)
    sent, received = socket.socketpair()
    queue = relay_module.SimpleQueue()
    try:
        monkeypatch.setattr(relay_module, "time", Clock)
        queue.put((Clock.perf_counter(), b"payload"))
        queue.put(None)
        relay._send(queue, sent, relay.up, lambda: None)  # in this thread: an exception fails the test
        monkeypatch.undo()
        received.settimeout(10)
        assert _recv_exactly(received, 7) == b"payload" and received.recv(1) == b""  # then the EOF
        assert relay.up.chunks == 1 and relay.up.delay_max_s == pytest.approx(0.02)
    finally:
        sent.close()
        received.close()
        relay.stop()

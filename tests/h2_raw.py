"""A hostile HTTP/2 client on a plain socket, for the attack tests: connections that stay idle or send
only the preface, gRPC streams whose receive window is 0 (a client that never reads its replies), and
health Watch floods. Only what the attacks need: no HPACK decoding, no flow control of its own.

Every connection is closed by `close()` (tests use it in a `with` block): nothing is left open."""
from __future__ import annotations

import socket
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
INITIAL_WINDOW_SIZE = 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer with a `prefix_bits` prefix (RFC 7541 5.1)."""
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes([first | value])
    out, value = bytearray([first | top]), value - top
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def _literal(name: str, value: str | bytes) -> bytes:
    """A header field, literal without indexing, new name (no Huffman)."""
    value = value.encode() if isinstance(value, str) else value
    return b"\x00" + _int(len(name), 7) + name.encode() + _int(len(value), 7) + value


def grpc_headers(authority: str, path: str, metadata=()) -> bytes:
    block = (b"\x83"  # :method POST (static table 3)
             + b"\x86"  # :scheme http (6)
             + _int(4, 4) + _int(len(path), 7) + path.encode()  # :path, indexed name 4
             + _int(1, 4) + _int(len(authority), 7) + authority.encode()  # :authority, indexed name 1
             + _literal("content-type", "application/grpc") + _literal("te", "trailers"))
    for k, v in metadata:
        block += _literal(k, v)
    return block


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


class RawConnection:
    """One TCP connection to `port` on 127.0.0.1. `handshake()` sends the preface and a SETTINGS frame
    (INITIAL_WINDOW_SIZE `window`: 0 means the server may send no reply data on any stream) and
    acknowledges the server's SETTINGS; then `open_stream` starts gRPC calls that are never read."""

    def __init__(self, port: int, timeout: float = 5.0):
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.next_stream = 1

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def handshake(self, window: int | None = 0) -> None:
        settings = b"" if window is None else struct.pack(">HI", INITIAL_WINDOW_SIZE, window)
        self.send(PREFACE + frame(SETTINGS, 0, 0, settings))
        self._await_settings()
        self.send(frame(SETTINGS, ACK, 0))

    def _await_settings(self) -> None:
        buf = b""
        while True:  # the server's first frame is its SETTINGS (a few frames at most)
            while len(buf) < 9:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the server closed the connection during the handshake")
                buf += chunk
            length, kind, flags = int.from_bytes(buf[:3], "big"), buf[3], buf[4]
            while len(buf) < 9 + length:
                buf += self.sock.recv(65536)
            buf = buf[9 + length:]
            if kind == SETTINGS and not flags & ACK:
                return

    def open_stream(self, path: str, messages: list[bytes] = (), metadata=(), end: bool = False) -> int:
        """A gRPC call: headers, then each message as a DATA frame (END_STREAM on the last if `end`)."""
        sid, self.next_stream = self.next_stream, self.next_stream + 2
        out = frame(HEADERS, END_HEADERS | (END_STREAM if end and not messages else 0), sid,
                    grpc_headers(f"127.0.0.1:{self.port}", path, metadata))
        for i, m in enumerate(messages):
            last = end and i == len(messages) - 1
            out += frame(DATA, END_STREAM if last else 0, sid, grpc_message(m))
        self.send(out)
        return sid

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class RawConnections:
    """Many RawConnection, closed together."""

    def __init__(self):
        self.conns: list[RawConnection] = []

    def add(self, conn: RawConnection) -> RawConnection:
        self.conns.append(conn)
        return conn

    def __enter__(self) -> "RawConnections":
        return self

    def __exit__(self, *exc) -> None:
        for c in self.conns:
            c.close()
        self.conns.clear()

"""Does the server at a gRPC target speak TLS? Asked after a connection failed, so that a client
and server that disagree (one TLS, one plaintext) are told so, with the flag that fixes it,
instead of "cannot reach". gRPC's own error for that case is only its wording ("Socket closed",
"handshake failed"); this asks the server itself: one TCP connection and a TLS ClientHello that
checks no certificate. Standard library only.
"""
from __future__ import annotations

import socket
import ssl

PROBE_TIMEOUT_S = 1.0


def host_port(target: str) -> tuple[str, int] | None:
    """(host, port) of a gRPC target (host:port, [v6]:port, dns:///..., ipv4:/ipv6:...); None for a unix
    socket or a target without a numeric port."""
    target = target.strip()
    if target.startswith(("unix:", "unix-abstract:", "vsock:")):
        return None
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme):].split(",")[0]
            break
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def speaks_tls(target: str, timeout: float = PROBE_TIMEOUT_S) -> bool | None:
    """True: the server answered a TLS handshake (or a TLS alert: it wants a client certificate);
    False: it answered something else (plaintext HTTP/2) or hung up on the handshake; None: cannot
    tell (no TCP connection, a unix socket, a timeout)."""
    address = host_port(target)
    if address is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only the protocol is asked, not whom to trust
    context.set_alpn_protocols(["h2"])
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError:
        return None
    with sock:
        try:
            with context.wrap_socket(sock, server_hostname=address[0]):
                return True
        except ssl.SSLError as e:  # a TLS alert is TLS; a record that is not TLS, or an EOF, is not
            return "ALERT" in (e.reason or "")
        except (ConnectionResetError, BrokenPipeError):
            return False
        except OSError:  # a timeout: a server that takes bytes and says nothing
            return None


def mismatch(target: str, client_tls: bool, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """A message when the server at `target` speaks TLS and the client not, or the other way round."""
    server_tls = speaks_tls(target, timeout)
    if server_tls is None or server_tls == client_tls:
        return None
    if server_tls:
        return (f"the cloud server at {target} speaks TLS and this client plaintext: pass --tls-ca FILE (the "
                "server's CA or self-signed certificate; tls_ca= in the Python API), or --tls when a CA the system "
                "trusts signed its certificate (tls=True)")
    return (f"the cloud server at {target} speaks plaintext (no TLS) and this client TLS: leave out --tls, --tls-ca, "
            "--tls-cert and --tls-key (tls=, tls_ca=, tls_cert=, tls_key= in the Python API), or serve with TLS "
            "(sllm-cloud serve --tls-cert FILE --tls-key FILE)")

"""What a failed cloud call means to the edge, decided on its status code and ErrorReason only (never on
the message, which is for people and may change), and the edge's own errors.

A status without a reason did not come from the service: gRPC itself, a proxy or the network. Of those,
UNAVAILABLE, INTERNAL (a stream a proxy reset: nginx when the replica behind it died), CANCELLED,
ABORTED and UNKNOWN (a stream that ended without an answer) are transport failures: worth reaching the
server again. DEADLINE_EXCEEDED never is: waiting as long again would not help.
"""
from __future__ import annotations

import grpc

from sllm.protos.client import CloudError
from sllm.protos.errors import UNSPECIFIED
from sllm.protos.tls_probe import mismatch as tls_mismatch
from sllm.protos.v1 import sllm_pb2 as pb

C = grpc.StatusCode
_TRANSPORT = {C.UNAVAILABLE, C.INTERNAL, C.CANCELLED, C.ABORTED, C.UNKNOWN}
# the server (or its balancer) cannot serve now; another try, maybe another replica, may
_PASSING = {pb.SHUTTING_DOWN, pb.MODEL_STOPPED, pb.NO_REPLICA}
# the session is gone from the server: reopen it from the history
_SESSION_LOST = _PASSING | {pb.SESSION_NOT_FOUND, pb.SESSION_IDLE, pb.STREAM_ENDED}


class EdgeError(Exception):
    """A failure to explain to the user in one message (no traceback). `code` and `reason`: those of the
    cloud call behind it, if one is (None otherwise): for programs, which never parse the message."""

    def __init__(self, message: str, error: CloudError | EdgeError | None = None):
        super().__init__(message)
        self.code = error.code if error is not None else None
        self.reason = error.reason if error is not None else None


class TurnError(EdgeError):
    """This turn cannot run (the conversation is full, the prompt is empty); the session is intact."""


def transport_failure(e: CloudError) -> bool:
    """The connection or the stream failed below the service (no reason: gRPC, a proxy, the network)."""
    return e.reason == UNSPECIFIED and e.code in _TRANSPORT


def retryable(e: CloudError) -> bool:
    """A failure to reach a server or open a session that may pass (a replica restarting or draining, a
    balancer between two configs)."""
    return transport_failure(e) or e.reason in _PASSING


def rebuildable(e: CloudError) -> bool:
    """Did the server lose or drop the session (worth reopening it from the history)?"""
    return transport_failure(e) or e.reason in _SESSION_LOST


def why(e: CloudError) -> str:
    """A lost stream in a few words (the notice of a rebuild)."""
    words = f"{e.code.name}: {e.details}" if e.details else e.code.name
    if e.code == C.INTERNAL and transport_failure(e):
        return f"{words}: the replica behind the balancer went away"
    return words


def explain(e: CloudError, target: str, timeout: float | None = None, tls: bool = False) -> str:
    """A CloudError in words: what happened and what to do (tls: the channel uses TLS)."""
    code, reason, details = e.code, e.reason, e.details or ""
    if reason == pb.NO_REPLICA:
        return (f"the load balancer at {target} has no cloud replica to send to ({details}): every replica "
                "behind it is down or draining")
    if reason == pb.SHUTTING_DOWN:
        return f"the cloud server at {target} is shutting down ({details})"
    if reason == pb.MODEL_STOPPED:
        return f"the cloud server at {target} cannot serve: {details}"
    if reason == pb.MODEL_MISMATCH:
        return f"the edge bundle and the cloud model are not halves of the same model: {details}"
    if code == C.UNAVAILABLE:
        disagree = tls_mismatch(target, tls)  # one TLS handshake with the server: does it speak TLS?
        if disagree is not None:
            return disagree
        hint = ("; with TLS, also check the CA (--tls-ca), the name (--server-name) and, for a server that "
                "requires client certificates, --tls-cert/--tls-key") if tls else ""
        return (f"cannot reach the cloud server at {target} ({details or 'unavailable'}); is it running? "
                f"(`sllm-cloud serve --bundle DIR/cloud`, or `edge-chat --local` to start one here){hint}")
    if code == C.UNAUTHENTICATED:
        return (f"the cloud server at {target} refused the bearer token ({details}); pass the right one with "
                "--token or $SLLM_CLOUD_TOKEN")
    if code == C.DEADLINE_EXCEEDED:
        if timeout is None:  # a step: the details say which deadline
            return (f"no answer from the cloud server at {target}: {details} (it is overloaded, stopped or "
                    "unreachable; --step-timeout / step_timeout= sets the deadline)")
        return f"no answer from the cloud server at {target} within {timeout:g} s ({details})"
    if code == C.RESOURCE_EXHAUSTED:
        return f"the cloud server at {target} is out of room: {details} (/reset starts a new conversation)"
    return f"the cloud server at {target} answered {code.name}: {details}"

"""Who a caller is: bearer tokens (every RPC but health checking needs `authorization: Bearer <token>`,
checked before the method is even looked up), verified client certificates (mutual TLS), and the
owner key that sessions are bound to."""
from __future__ import annotations

import hashlib
import hmac
import logging

import grpc

from sllm.cloud.errors import ServiceError, abort
from sllm.cloud.jsonlog import LogRateLimit, log
from sllm.protos.v1 import sllm_pb2 as pb

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REJECT_LOG_INTERVAL_S = 10.0  # at most one `unauthenticated` log line this often (the rest are counted)
ANONYMOUS = ""  # the owner of every session on a server without authentication


def _bearer(metadata) -> str | None | bool:
    """The token of the first authorization header; None when there is none, False when it is not Bearer."""
    values = [v for k, v in (metadata or ()) if k == "authorization"]
    if not values:
        return None
    value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return False
    return token


def owner_of(context, *, tokens: bool, client_certs: bool) -> str:
    """The key a caller's sessions are filed under: a hash of its bearer token when tokens are on,
    else a hash of its (verified) client certificate under mutual TLS, else ANONYMOUS. Two callers
    with different tokens never see each other's sessions, whatever ids they send."""
    if tokens:
        token = _bearer(context.invocation_metadata())
        if token:  # the interceptor has let only valid tokens through
            return "token:" + hashlib.sha256(token.encode()).hexdigest()
    if client_certs:
        certs = context.auth_context().get("x509_pem_cert") or []
        if certs:
            return "cert:" + hashlib.sha256(certs[0]).hexdigest()
    return ANONYMOUS


def _rejecting_handler(message: str, on_reject) -> grpc.RpcMethodHandler:
    """A handler that ends any RPC (whatever its cardinality) with UNAUTHENTICATED, without reading
    the request: stream-stream never waits for a request message before running."""

    async def reject(_request_iterator, context):
        on_reject(context.peer(), message)
        await abort(context, ServiceError(pb.BAD_TOKEN, message))

    return grpc.stream_stream_rpc_method_handler(reject)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token of every RPC but the exempt ones (health), before the method is
    looked up: an unauthenticated caller gets UNAUTHENTICATED for any method name, known or not."""

    def __init__(self, tokens: list[str], on_reject=None, exempt_prefixes: tuple[str, ...] = (HEALTH_PREFIX,)):
        if not tokens:
            raise ValueError("BearerAuthInterceptor needs at least one token")
        self.tokens = [t.encode() for t in tokens]
        self.exempt = exempt_prefixes
        self.on_reject = on_reject
        self.log_limit = LogRateLimit(REJECT_LOG_INTERVAL_S)

    def check(self, metadata) -> str | None:
        token = _bearer(metadata)
        if token is None:
            return "missing 'authorization: Bearer <token>' metadata"
        if token is False:
            return "the authorization metadata must be 'Bearer <token>'"
        given = token.encode()
        ok = False
        for t in self.tokens:  # compare against every token: no early exit, constant time each
            ok |= hmac.compare_digest(given, t)
        return None if ok else "invalid bearer token"

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self.exempt):
            return await continuation(handler_call_details)
        problem = self.check(handler_call_details.invocation_metadata)
        if problem is None:
            return await continuation(handler_call_details)
        return _rejecting_handler(problem, lambda peer, reason: self._rejected(method, peer, reason))

    def _rejected(self, method: str, peer: str, reason: str) -> None:
        if self.on_reject:
            self.on_reject()
        suppressed = self.log_limit.take()
        if suppressed is not None:
            log("unauthenticated", logging.WARNING, method=method[:200], peer=peer, reason=reason,
                suppressed=suppressed)

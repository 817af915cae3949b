"""Bearer-token auth: every RPC but health checking needs `authorization: Bearer <token>`."""
from __future__ import annotations

import hmac
import logging

import grpc

from cloud.jsonlog import log

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def _rejecting_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    def abort(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class BearerAuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, tokens: list[str], on_reject=None, exempt_prefixes: tuple[str, ...] = (HEALTH_PREFIX,)):
        if not tokens:
            raise ValueError("BearerAuthInterceptor needs at least one token")
        self.tokens = [t.encode() for t in tokens]
        self.exempt = exempt_prefixes
        self.on_reject = on_reject

    def _check(self, metadata) -> str | None:
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return "missing 'authorization: Bearer <token>' metadata"
        scheme, _, token = (values[0] if isinstance(values[0], str) else values[0].decode("latin-1")).partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "the authorization metadata must be 'Bearer <token>'"
        given = token.strip().encode()
        ok = False
        for t in self.tokens:  # compare against every token: no early exit, constant time each
            ok |= hmac.compare_digest(given, t)
        return None if ok else "invalid bearer token"

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self.exempt):
            return continuation(handler_call_details)
        problem = self._check(handler_call_details.invocation_metadata)
        handler = continuation(handler_call_details)
        if problem is None or handler is None:
            return handler
        log("unauthenticated", logging.WARNING, method=method, reason=problem)
        if self.on_reject:
            self.on_reject()
        return _rejecting_handler(handler, problem)

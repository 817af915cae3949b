"""One exception for every request the service refuses: an ErrorReason, the gRPC status code it goes
with, and a clear message. `abort` is the one place a status leaves the server: the message for
people, the reason (trailing metadata, protos.errors) for programs, which decide on it alone."""
from __future__ import annotations

import grpc

from sllm.protos.errors import reason_metadata, reason_name
from sllm.protos.v1 import sllm_pb2 as pb

C = grpc.StatusCode
# each reason's status code (sllm.proto, ErrorReason)
CODES = {
    pb.BAD_REQUEST: C.INVALID_ARGUMENT,
    pb.OUT_OF_ORDER: C.FAILED_PRECONDITION,
    pb.MODEL_MISMATCH: C.FAILED_PRECONDITION,
    pb.SESSION_ATTACHED: C.FAILED_PRECONDITION,
    pb.HISTORY_MISMATCH: C.FAILED_PRECONDITION,
    pb.SESSION_NOT_FOUND: C.NOT_FOUND,
    pb.SESSION_IDLE: C.RESOURCE_EXHAUSTED,
    pb.SESSION_FULL: C.RESOURCE_EXHAUSTED,
    pb.SERVER_FULL: C.RESOURCE_EXHAUSTED,
    pb.SHUTTING_DOWN: C.UNAVAILABLE,
    pb.MODEL_STOPPED: C.UNAVAILABLE,
    pb.MODEL_FAILED: C.INTERNAL,
    pb.OPEN_TIMEOUT: C.DEADLINE_EXCEEDED,
    pb.BAD_TOKEN: C.UNAUTHENTICATED,
    pb.SERVER_BUG: C.INTERNAL,
    pb.STREAM_ENDED: C.CANCELLED,
}


class ServiceError(Exception):
    def __init__(self, reason: int, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.reason, self.message = reason, message
        self.code = code or CODES[reason]  # a reason's own code unless told (MODEL_FAILED out of memory)

    def __str__(self) -> str:
        return f"{self.code.name} ({reason_name(self.reason)}): {self.message}"


def invalid(message: str) -> ServiceError:
    return ServiceError(pb.BAD_REQUEST, message)


async def abort(context, error: ServiceError) -> None:
    """End the RPC with `error`: its code, its message, its reason in the trailing metadata."""
    await context.abort(error.code, error.message, reason_metadata(error.reason))

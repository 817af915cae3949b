"""The machine-readable reason of an error status (`sllm.v1.ErrorReason`), as it travels: the trailing
metadata entry REASON_KEY holding the reason's name. The server writes it (`reason_metadata`), the
client reads it (`reason_of`); both sides decide on it and the status code, never on the message."""
from __future__ import annotations

from sllm.protos.v1 import sllm_pb2 as pb

REASON_KEY = "sllm-error-reason"
UNSPECIFIED = pb.ERROR_REASON_UNSPECIFIED


def reason_metadata(reason: int) -> tuple[tuple[str, str], ...]:
    """Trailing metadata that carries `reason` (an ErrorReason value)."""
    return ((REASON_KEY, pb.ErrorReason.Name(reason)),)


def reason_of(metadata) -> int:
    """The ErrorReason in a call's trailing metadata; UNSPECIFIED when there is none (the status came
    from gRPC, a proxy or the network, not from the service) or one this client does not know."""
    for key, value in metadata or ():
        if key == REASON_KEY:
            return pb.ErrorReason.Value(value) if value in pb.ErrorReason.keys() else UNSPECIFIED
    return UNSPECIFIED


def reason_name(reason: int) -> str:
    return pb.ErrorReason.Name(reason) if reason in pb.ErrorReason.values() else str(reason)

"""Typed errors, each carrying the gRPC status it maps to.

    ScistreamError
    ├── InvalidArgument        INVALID_ARGUMENT
    │   └── LocalMistake       (found by the client, nothing sent: CLIs exit 2)
    ├── NotFound               NOT_FOUND
    ├── AlreadyExists          ALREADY_EXISTS
    ├── FailedPrecondition     FAILED_PRECONDITION
    │   └── InvalidTransition
    ├── ResourceExhausted      RESOURCE_EXHAUSTED
    │   ├── PortsExhausted
    │   └── BandwidthExhausted
    ├── Unauthenticated        UNAUTHENTICATED
    ├── PermissionDenied       PERMISSION_DENIED
    ├── DeadlineExceeded       DEADLINE_EXCEEDED
    ├── DataServerError        INTERNAL (a data server failed to start or died)
    └── CertificateRejected    UNAVAILABLE (the server's TLS certificate does not verify
                               against the one the client was given: CLIs exit 2)

The message of each says what to do next. The servicer turns them into a status code
and message (``scistream.control.servicer``); the client turns status codes back into
these classes (``scistream.client``), so both sides speak the same vocabulary.
"""
from __future__ import annotations

import grpc


class ScistreamError(Exception):
    """Base of every error this package raises on purpose."""

    status: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class InvalidArgument(ScistreamError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class LocalMistake(InvalidArgument):
    """A mistake the client itself found before sending anything (a malformed address,
    uid or size, a certificate file it cannot read). CLIs say so and exit 2 (usage)."""

    usage = True


class NotFound(ScistreamError):
    status = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ScistreamError):
    status = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ScistreamError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class InvalidTransition(FailedPrecondition):
    def __init__(self, uid: str, old: object, new: object) -> None:
        super().__init__(f"session {uid} is {getattr(old, 'value', old)}; "
                         f"it cannot become {getattr(new, 'value', new)}")


class ResourceExhausted(ScistreamError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class PortsExhausted(ResourceExhausted):
    """Port range full; safe to retry later."""

    def __init__(self, *, wanted: int, free: int, ports: range, busy: int = 0) -> None:
        held = f" ({busy} held by other programs)" if busy else ""
        super().__init__(
            f"need {wanted} ports, {free} free in {ports.start}-{ports.stop - 1}{held}; "
            "release idle sessions or widen --port-range")


class BandwidthExhausted(ResourceExhausted):
    def __init__(self, *, wanted: int, left: int) -> None:
        super().__init__(
            f"rate {wanted} kbit/s asked, {left} kbit/s left on this node (--max-rate); "
            "ask for less or release other sessions")


class Unauthenticated(ScistreamError):
    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ScistreamError):
    status = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(ScistreamError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class DataServerError(ScistreamError):
    status = grpc.StatusCode.INTERNAL


class CertificateRejected(ScistreamError):
    """The control server's TLS certificate does not verify against the certificate the
    client was given (or the system's roots): a configuration mistake on the caller's side,
    not something to retry. CLIs exit 2."""

    status = grpc.StatusCode.UNAVAILABLE
    usage = True


_BY_STATUS: dict[grpc.StatusCode, type[ScistreamError]] = {
    cls.status: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
                ResourceExhausted, Unauthenticated, PermissionDenied, DeadlineExceeded,
                DataServerError)
}


def from_status(code: grpc.StatusCode, message: str) -> ScistreamError:
    """The typed error for a gRPC status (the client side of the mapping)."""
    cls = _BY_STATUS.get(code, ScistreamError)
    err = cls(message)
    err.status = code
    return err

"""Typed errors, each carrying the status it maps to (``Status``: gRPC's codes, by name).

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

The message of each says what to do next. The servicer turns them into a gRPC status
code and message (``scistream.control.servicer``, the one place that speaks gRPC's);
the client turns status codes back into these classes (``from_status``), so both sides
speak the same vocabulary. No gRPC here: the data plane uses these too.
"""
from __future__ import annotations

import enum


class Status(enum.Enum):
    """The status of a failed call, named as gRPC's codes are (``grpc.StatusCode[s.name]``)."""
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ScistreamError(Exception):
    """Base of every error this package raises on purpose."""

    status: Status = Status.UNKNOWN


class InvalidArgument(ScistreamError):
    status = Status.INVALID_ARGUMENT


class LocalMistake(InvalidArgument):
    """A mistake the client itself found before sending anything (a malformed address,
    uid or size, a certificate file it cannot read). CLIs say so and exit 2 (usage)."""

    usage = True


class NotFound(ScistreamError):
    status = Status.NOT_FOUND


class AlreadyExists(ScistreamError):
    status = Status.ALREADY_EXISTS


class FailedPrecondition(ScistreamError):
    status = Status.FAILED_PRECONDITION


class InvalidTransition(FailedPrecondition):
    def __init__(self, uid: str, old: object, new: object) -> None:
        super().__init__(f"session {uid} is {getattr(old, 'value', old)}; "
                         f"it cannot become {getattr(new, 'value', new)}")


class ResourceExhausted(ScistreamError):
    status = Status.RESOURCE_EXHAUSTED


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
    status = Status.UNAUTHENTICATED


class PermissionDenied(ScistreamError):
    status = Status.PERMISSION_DENIED


class DeadlineExceeded(ScistreamError):
    status = Status.DEADLINE_EXCEEDED


class DataServerError(ScistreamError):
    status = Status.INTERNAL


class CertificateRejected(ScistreamError):
    """The control server's TLS certificate does not verify against the certificate the
    client was given (or the system's roots): a configuration mistake on the caller's side,
    not something to retry. CLIs exit 2."""

    status = Status.UNAVAILABLE
    usage = True


_BY_STATUS: dict[Status, type[ScistreamError]] = {
    cls.status: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
                ResourceExhausted, Unauthenticated, PermissionDenied, DeadlineExceeded,
                DataServerError)
}


def from_status(code: Status | str, message: str) -> ScistreamError:
    """The typed error for a status, or for a status name (``grpc.StatusCode.X.name``): the
    client side of the mapping."""
    status = code if isinstance(code, Status) else Status[code]
    err = _BY_STATUS.get(status, ScistreamError)(message)
    err.status = status
    return err

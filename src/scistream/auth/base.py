"""The authenticator interface.

An authenticator turns the ``authorization`` metadata of a call (bare token or
``Bearer <token>``) into an ``Identity``, or raises ``Unauthenticated`` with a message
that says what to do. Tokens are never logged.

    auth = make_authenticator("none")
    who = await auth.authenticate(metadata_value)   # Identity(id="anonymous", ...)
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any

from ..errors import ScistreamError, Status, Unauthenticated


@dataclasses.dataclass(frozen=True)
class Identity:
    id: str                 # stable: "<issuer>|<sub>" or a name from the static file
    name: str = ""          # for humans and logs (username, e-mail)

    def __str__(self) -> str:
        return self.name or self.id


ANONYMOUS = Identity("anonymous", "anonymous")

LOGIN_HINT = "run `s2uc login` (or pass --token / SCISTREAM_TOKEN) and try again"


class AuthConfigError(ValueError):
    """An authenticator cannot be built from its options; the message says what to change."""


class AuthUnavailable(ScistreamError):
    """The token could not be checked right now (identity provider unreachable): retry later."""

    status = Status.UNAVAILABLE


def bearer(value: str | None) -> str | None:
    """The token from an ``authorization`` value: bare or ``Bearer <token>``."""
    if value is None:
        return None
    value = value.strip()
    if value[:7].lower() == "bearer ":
        value = value[7:].strip()
    return value or None


class Authenticator(abc.ABC):
    name = ""
    options: tuple[str, ...] = ()   # the auth_options this kind understands

    @abc.abstractmethod
    async def authenticate(self, authorization: str | None) -> Identity:
        """Return the caller's identity or raise Unauthenticated."""

    async def close(self) -> None:
        pass


class NoAuth(Authenticator):
    """Development mode: every caller is the same anonymous identity."""

    name = "none"

    async def authenticate(self, authorization: str | None) -> Identity:
        return ANONYMOUS


def _kind(kind: str) -> type[Authenticator]:
    if kind == "none":
        return NoAuth
    if kind == "static":
        from .static import StaticAuth
        return StaticAuth
    if kind == "jwt":
        from .jwt import JwtAuth
        return JwtAuth
    if kind == "globus":
        from .globus import GlobusAuth
        return GlobusAuth
    raise AuthConfigError(f"unknown --auth {kind!r}; choose none, static, jwt or globus")


def make_authenticator(kind: str, **options: Any) -> Authenticator:
    """The authenticator ``s2cs --auth KIND`` names, built from its options.

    Options left at None are ignored; an option meant for another kind is an error, so
    ``--auth static --jwt-jwks keys.json`` does not silently run without the JWT check.
    """
    cls = _kind(kind.lower())
    given = {k: v for k, v in options.items() if v is not None}
    if stray := sorted(k for k in given if k not in cls.options):
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        raise AuthConfigError(f"{flags} does not apply to --auth {kind}")
    if cls is NoAuth:
        return NoAuth()
    return cls.from_options(**given)  # type: ignore[attr-defined]


def require_token(authorization: str | None) -> str:
    """The bearer token of a call; a missing one (or the original's INVALID_TOKEN) is
    Unauthenticated."""
    token = bearer(authorization)
    if token is None or token == "INVALID_TOKEN":
        raise Unauthenticated(f"no access token sent; {LOGIN_HINT}")
    return token

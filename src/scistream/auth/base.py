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
import logging
from typing import Any

from ..errors import Unauthenticated

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Identity:
    id: str                 # stable: "<issuer>|<sub>" or a name from the static file
    name: str = ""          # for humans and logs (username, e-mail)

    def __str__(self) -> str:
        return self.name or self.id


ANONYMOUS = Identity("anonymous", "anonymous")


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


def make_authenticator(kind: str, **options: Any) -> Authenticator:
    kind = kind.lower()
    if kind == "none":
        return NoAuth()
    if kind == "static":
        from .static import StaticAuth
        return StaticAuth.from_options(**options)
    if kind == "jwt":
        from .jwt import JwtAuth
        return JwtAuth.from_options(**options)
    if kind == "globus":
        from .globus import GlobusAuth
        return GlobusAuth.from_options(**options)
    raise ValueError(f"unknown --auth {kind!r}; choose none, static, jwt or globus")


def require_token(authorization: str | None) -> str:
    token = bearer(authorization)
    if token is None or token == "INVALID_TOKEN":
        raise Unauthenticated("no access token sent; run `s2uc login` (or pass --token / "
                              "SCISTREAM_TOKEN) and try again")
    return token

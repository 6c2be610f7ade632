"""``s2cs --auth static``: a file of token hashes, and the commands that edit it.

The token file holds one line per token: the SHA-256 of the token and the identity it
stands for. The tokens themselves are never stored; ``add_token`` prints a new one once.
The server re-reads the file when it changes, so tokens added or removed take effect
without a restart.

    # scistream static tokens: s2cs --auth static --token-file FILE
    sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8 alice@uni.edu
    sha256:6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b bob

    token = add_token(Path("tokens.txt"), "alice@uni.edu")   # printed once by `s2cs token add`
    auth = StaticAuth(Path("tokens.txt"))
    await auth.authenticate(f"Bearer {token}")                 # Identity("alice@uni.edu")
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import tempfile
from pathlib import Path

from ..errors import Unauthenticated
from .base import AuthConfigError, Authenticator, Identity, LOGIN_HINT, require_token

log = logging.getLogger(__name__)

HEADER = ("# scistream static tokens: s2cs --auth static --token-file FILE\n"
          "# <sha256:hex digest of the token> <identity>; add with `s2cs token add IDENTITY`\n")
TOKEN_PREFIX = "sst_"
_HASH = re.compile(r"^(?:sha256:)?([0-9a-fA-F]{64})$")
_IDENTITY = re.compile(r"^\S{1,256}$")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_token_file(path: Path) -> dict[str, str]:
    """hash -> identity. Raises AuthConfigError naming the line that is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AuthConfigError(f"token file {path} does not exist; create it with "
                              f"`s2cs token add IDENTITY --token-file {path}`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthConfigError(f"cannot read token file {path}: {exc}") from None
    table: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise AuthConfigError(f"{path}:{n}: expected `sha256:<64 hex digits> <identity>`, "
                                  f"got {len(parts)} fields")
        if not (m := _HASH.match(parts[0])):
            raise AuthConfigError(f"{path}:{n}: the first field must be sha256:<64 hex digits> "
                                  "(the token's hash, never the token itself)")
        digest = m.group(1).lower()
        if digest in table:
            raise AuthConfigError(f"{path}:{n}: the same token hash appears twice")
        table[digest] = parts[1]
    return table


def _write(path: Path, text: str) -> None:
    """Replace ``path`` atomically with a file of mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_token(path: Path, identity: str) -> str:
    """Make a new token for ``identity``, store its hash in ``path``, return the token."""
    if not _IDENTITY.match(identity):
        raise AuthConfigError(f"identity {identity!r} must be 1-256 characters without spaces")
    if path.exists():
        parse_token_file(path)  # refuse to append to a broken file
        existing = path.read_text(encoding="utf-8")
    else:
        existing = HEADER
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    if existing and not existing.endswith("\n"):
        existing += "\n"
    _write(path, existing + f"sha256:{token_hash(token)} {identity}\n")
    log.info("token added for %s in %s", identity, path)
    return token


def remove_identity(path: Path, identity: str) -> int:
    """Remove every token of ``identity``; return how many were removed."""
    parse_token_file(path)
    kept, removed = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        parts = line.split()
        if len(parts) == 2 and not line.lstrip().startswith("#") and parts[1] == identity:
            removed += 1
            continue
        kept.append(line)
    if removed:
        _write(path, "".join(kept))
    return removed


def list_identities(path: Path) -> list[tuple[str, str]]:
    """(identity, short hash) pairs, for `s2cs token list`."""
    return [(ident, f"sha256:{digest[:12]}…") for digest, ident in parse_token_file(path).items()]


class StaticAuth(Authenticator):
    """Tokens whose SHA-256 is listed in a file; the file is re-read when it changes."""

    name = "static"
    options = ("token_file",)

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._table: dict[str, str] = {}
        self._reload(initial=True)

    @classmethod
    def from_options(cls, token_file: str | Path | None = None) -> "StaticAuth":
        if token_file is None:
            raise AuthConfigError("--auth static needs --token-file FILE; create one with "
                                  "`s2cs token add IDENTITY --token-file FILE`")
        return cls(Path(token_file))

    def _reload(self, initial: bool = False) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if initial:
                parse_token_file(self.path)  # raises with the how-to message
            log.error("token file %s disappeared; no token is accepted until it is back", self.path)
            self._table, self._stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        if st.st_mode & 0o022:
            log.warning("token file %s is writable by group or others; anyone who can write it "
                        "can grant themselves access (chmod 600)", self.path)
        try:
            table = parse_token_file(self.path)
        except AuthConfigError as exc:
            if initial:
                raise
            log.error("%s; keeping the %d tokens read before", exc, len(self._table))
            self._stamp = stamp
            return
        if not table:
            log.warning("token file %s lists no token; every call will be refused", self.path)
        elif not initial:
            log.info("token file %s re-read: %d tokens", self.path, len(table))
        self._table, self._stamp = table, stamp

    async def authenticate(self, authorization: str | None) -> Identity:
        token = require_token(authorization)
        self._reload()
        if (ident := self._table.get(token_hash(token))) is None:
            raise Unauthenticated("this token is not known to this S2CS (static token file); "
                                  f"ask the operator for one with `s2cs token add`, or {LOGIN_HINT}")
        return Identity(ident, ident)

"""What every CLI shares: option spellings, exit codes, error printing, the token.

Every long option answers to its dashed name and to the original tooling's underscore
spelling (``--num-conn`` and ``--num_conn``), so existing scripts keep working.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

import click
from rich.console import Console
from rich.markup import escape

from ..addr import check_uid
from ..client import AsyncClient, ChannelOptions, sessionfile
from ..errors import CertificateRejected, InvalidArgument, LocalMistake, ScistreamError
from ..units import SIZE_HELP, parse_size

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Exit(enum.IntEnum):
    """Exit codes: what to do next."""
    OK = 0        # done
    REFUSED = 1   # the server said no (bad input, not found, permission): fix and retry
    USAGE = 2     # bad command line
    LOGIN = 3     # not authenticated: run `s2uc login` or pass a token
    RETRY = 4     # unavailable, busy, out of ports or time: retry later
    FAILED = 5    # the transfer or the data server failed


_EXIT_FOR = {
    "UNAUTHENTICATED": Exit.LOGIN,
    "UNAVAILABLE": Exit.RETRY,
    "RESOURCE_EXHAUSTED": Exit.RETRY,
    "DEADLINE_EXCEEDED": Exit.RETRY,
    "INTERNAL": Exit.FAILED,
}

EXIT_CODES_HELP = ("Exit codes: 0 ok; 1 refused by the server (bad input, unknown uid, not yours); "
                   "2 usage or configuration mistake found here (bad address, uid or size, a "
                   "certificate that does not verify); 3 not logged in; 4 unavailable/busy, retry "
                   "later; 5 data path failed.")


def exit_code(exc: ScistreamError) -> Exit:
    """The exit code of an error, by the table above."""
    return Exit.USAGE if getattr(exc, "usage", False) else _EXIT_FOR.get(exc.status.name, Exit.REFUSED)


def error_label(exc: ScistreamError) -> str:
    """What kind of failure, in the parentheses of an error line."""
    if isinstance(exc, CertificateRejected):
        return "TLS"
    if getattr(exc, "usage", False):
        return "local mistake"
    return exc.status.name


class Size(click.ParamType):
    """A byte count, whole or with a K, M, G or T suffix (``units.parse_size``): the one
    meaning of every ``--size``: the bytes of the whole transfer, over all connections."""
    name = "size"

    def __init__(self, minimum: int = 1) -> None:
        self.minimum = minimum

    def convert(self, value, param, ctx) -> int:
        try:
            n = parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if n < self.minimum:
            self.fail(f"{value!r}: the size must be at least {self.minimum} byte(s)", param, ctx)
        return n


SIZE_OPTION_HELP = f"Bytes to stream in all, over every connection: {SIZE_HELP}."


def option(*names: str, **kw) -> Callable:
    """click.option with the original's underscore spelling added for every --long-name."""
    extra = [n.replace("-", "_").replace("__", "--", 1) for n in names
             if n.startswith("--") and "-" in n[2:]]
    return click.option(*names, *extra, **kw)


def die(message: str, code: int) -> NoReturn:
    """``message`` (rich markup) on stderr, then exit with ``code``."""
    err.print(message)
    sys.exit(code)


def fail(action: str, exc: ScistreamError) -> NoReturn:
    """One line on stderr, ``ACTION failed (WHAT): message``, and the table's exit code.
    WHAT is ``local mistake`` for what the client found before sending anything, ``TLS``
    for a certificate that does not verify, else the server's gRPC status."""
    die(f"[red]{escape(action)} failed[/] ({error_label(exc)}): {escape(str(exc))}", exit_code(exc))


def handle_errors(action: str):
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            try:
                return fn(*a, **kw)
            except ScistreamError as exc:
                fail(action, exc)
            except KeyboardInterrupt:
                die(f"[yellow]{escape(action)} interrupted[/]", 130)
        return wrapper
    return deco


def setup_logging(verbose: bool, *, quiet_default: bool = True) -> None:
    level = logging.DEBUG if verbose else (logging.WARNING if quiet_default else logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not verbose:
        logging.getLogger("grpc").setLevel(logging.WARNING)


def stacked(*decorators) -> Callable:
    """One decorator for ``decorators`` written one above the other (the first on top)."""
    return lambda fn: functools.reduce(lambda f, d: d(f), reversed(decorators), fn)


# -v/--verbose: debug logging, gRPC's own lines included (scistream.cli sets gRPC's verbosity
# before it is imported, from the command line)
verbose_option = click.option("--verbose", "-v", is_flag=True, expose_value=False, is_eager=True,
                              callback=lambda ctx, param, value: value and setup_logging(True),
                              help="Debug logging, gRPC's own included.")


def channel_options(fn=None, *, several: bool = False):
    """--server-cert, --insecure and --token (and -v) for every command that calls an S2CS;
    ``several``: --server-cert repeats, one per --s2cs (status and list ask several)."""
    which = ("; repeatable: one for every --s2cs, or one per --s2cs in the same order" if several else "")
    deco = stacked(
        option("--server-cert", "--server-crt", multiple=several, default=() if several else None,
               envvar="SCISTREAM_SERVER_CERT", show_envvar=True,
               help=f"PEM certificate to verify the S2CS against{which} (default: the one this client "
                    "recorded for that address, else ./server.crt if present, else the system's roots)."),
        option("--insecure", is_flag=True, default=False,
               help="Plaintext control channel (only for a server started with --insecure)."),
        option("--token", envvar="SCISTREAM_TOKEN", default=None, show_envvar=True,
               help="Access token to send (default: from `s2uc login`)."),
        verbose_option)
    return deco if fn is None else deco(fn)


def local_uid(uid: str) -> str:
    """A uid from the command line: a UUID, or a local mistake (exit 2), before anything is sent."""
    try:
        return check_uid(uid)
    except InvalidArgument as exc:
        raise LocalMistake(f"{exc}; nothing was sent") from None


def channel(s2cs: str, server_cert: str | None, insecure: bool, token: str | None, uid: str | None = None):
    """How to reach ``s2cs``: as the command line says, else as this client recorded it for
    ``uid`` (or for any session) in its session files (``client.sessionfile``)."""
    pem = None
    if not server_cert and not insecure:
        known = sessionfile.recorded_access(s2cs, uid)
        if known is not None:
            insecure = bool(known.get("insecure"))
            pem = known["cert_pem"].encode() if known.get("cert_pem") else None
    return ChannelOptions(server_cert=server_cert, insecure=insecure, token=resolve_token(token, s2cs),
                          cert_pem=pem)


def client(s2cs: str, server_cert: str | None, insecure: bool, token: str | None,
           uid: str | None = None) -> AsyncClient:
    """A client of ``s2cs`` reached as ``channel`` says."""
    return AsyncClient(s2cs, channel(s2cs, server_cert, insecure, token, uid))


def remember(uid: str, role: str, address: str, opts: ChannelOptions, **fields) -> None:
    """Record the side just set up (``client.sessionfile``): its address and how it was
    reached, the certificate's PEM (not its file, which may move) or plaintext."""
    pem = None if opts.insecure else opts.cert_pem
    if not opts.insecure and (cert := opts.resolved_cert()):
        with contextlib.suppress(OSError):
            pem = Path(cert).read_bytes()
    sessionfile.save_side(uid, role, address, cert_pem=pem, insecure=opts.insecure, **fields)


def resolve_token(explicit: str | None, s2cs: str | None = None) -> str | None:
    """The token to send: --token / SCISTREAM_TOKEN, else the login store's, else none.

    ``s2cs`` may name several instances of one facility ("a:5000,b:5000"): the login made
    for that whole value (``s2uc login --s2cs a:5000,b:5000``) is used, else the first
    instance, in order, with a login of its own (``s2uc login --s2cs a:5000``), else the
    first instance that the scope configured for it, or the default login, fits."""
    if explicit and explicit not in ("-", "INVALID_TOKEN"):
        return explicit
    if env := os.environ.get("SCISTREAM_TOKEN"):
        return env
    from ..auth.base import AuthConfigError
    from ..auth.tokens import namespace_for, namespaces, stored_token
    if not s2cs or "," not in s2cs:
        return stored_token(s2cs)
    instances = [a.strip() for a in s2cs.split(",") if a.strip()]
    try:
        have = set(namespaces())
    except AuthConfigError as exc:
        logging.getLogger(__name__).warning("%s", exc)
        return None
    for name in (s2cs, *instances):
        if namespace_for(name) in have:
            return stored_token(name)
    return next(filter(None, map(stored_token, instances)), None)

"""``s2uc login``, ``s2uc logout``, ``s2uc check-auth``: the user's Globus login.

    s2uc login --s2cs 10.0.0.2:5000 --scope https://auth.globus.org/scopes/<id>/scistream
    s2uc check-auth --s2cs 10.0.0.2:5000 --server-cert server.crt   # does that S2CS accept it?
    s2uc logout                                                      # revoke and forget all

Tokens are never printed; they live in the token store (``scistream.auth.tokens``).
"""
from __future__ import annotations

import asyncio
import datetime
import os
import socket
import sys
import webbrowser

import click
import globus_sdk
from rich.markup import escape
from rich.table import Table

from ..auth import login as flows
from ..auth.base import AuthConfigError
from ..auth.tokens import resolve_client_id, resolve_scope, settings_path, store_path
from ..client import AsyncClient, ChannelOptions
from ..errors import ScistreamError
from .common import Exit, channel_options, die, err, fail, handle_errors, option, out, resolve_token


def _when(seconds_from_now: float) -> str:
    at = datetime.datetime.now() + datetime.timedelta(seconds=seconds_from_now)
    return at.strftime("%Y-%m-%d %H:%M")


@click.command("login", epilog="Example: s2uc login --s2cs 10.0.0.2:5000 --no-browser")
@option("--s2cs", default=None, metavar="HOST:PORT",
        help="The S2CS this login is for (its scope may come from auth.toml); default: all.")
@option("--scope", default=None, help="The S2CS's Globus scope (default: from auth.toml or SCISTREAM_SCOPE).")
@option("--client-id", default=None,
        help="Client id of the native app (default: SCISTREAM_CLIENT_ID or auth.toml).")
@option("--no-browser", is_flag=True, help="Only print the login URL; do not open a browser.")
@handle_errors("login")
def login(s2cs: str | None, scope: str | None, client_id: str | None, no_browser: bool) -> None:
    """Log in with Globus Auth and keep the tokens for later commands."""
    try:
        cid = resolve_client_id(client_id)
        scope = resolve_scope(scope, s2cs)
        flow = flows.start_login(cid, scope, label=f"scistream on {socket.gethostname()}")
    except AuthConfigError as exc:
        die(f"[red]{escape(str(exc))}[/]", Exit.USAGE)
    out.print("Please log in with Globus at this URL:\n")
    out.print(flow.url, markup=False)
    out.print()
    can_open = sys.platform in ("darwin", "win32") or any(map(os.environ.get, ("DISPLAY", "WAYLAND_DISPLAY")))
    if not no_browser and can_open:
        webbrowser.open(flow.url, new=1)
    if not (code := click.prompt("Paste the authorization code here", prompt_suffix=": ").strip()):
        die("[red]login failed[/]: no code given", Exit.LOGIN)
    try:
        data = flows.finish_login(flow, code, s2cs=s2cs)
    except globus_sdk.GlobusAPIError as exc:
        die(f"[red]login failed[/]: Globus Auth refused the code ({exc.http_status} "
            f"{escape(str(exc.code))}); it expires within minutes and works once. "
            "Run `s2uc login` again.", Exit.LOGIN)
    except globus_sdk.NetworkError as exc:
        die(f"[red]login failed[/]: cannot reach Globus Auth ({type(exc).__name__}); retry later", Exit.RETRY)
    except AuthConfigError as exc:
        die(f"[red]login failed[/]: {escape(str(exc))}", Exit.LOGIN)
    where = s2cs or "every S2CS with this scope"
    out.print(f"Logged in for {escape(where)} (scope {escape(scope)}).")
    out.print(f"Access token valid until {_when(data.expires_at_seconds - datetime.datetime.now().timestamp())}"
              + (", refreshed automatically" if data.refresh_token else "")
              + f"; kept in {store_path()}")


@click.command("logout", epilog="Example: s2uc logout --s2cs 10.0.0.2:5000")
@option("--s2cs", default=None, metavar="HOST:PORT", help="Log out of this S2CS's login only (default: all).")
@handle_errors("logout")
def logout(s2cs: str | None) -> None:
    """Revoke the stored tokens at Globus Auth and delete them."""
    try:
        results = flows.logout(s2cs)
    except AuthConfigError as exc:
        die(f"[red]{escape(str(exc))}[/]", Exit.USAGE)
    if not results:
        out.print(f"Not logged in{' for ' + escape(s2cs) if s2cs else ''}; nothing to do.")
        return
    for r in results:
        out.print(f"Logged out of {escape(r.namespace)}: {r.revoked} tokens revoked and deleted.")
        for f in r.failures:
            err.print(f"[yellow]could not revoke {escape(f)}; deleted locally anyway[/]")


async def _probe(s2cs: str, opts: ChannelOptions) -> int:
    async with AsyncClient(s2cs, opts) as c:
        resp = await c.status(timeout=30)
    return len(resp.sessions)


@click.command("check-auth", epilog="Example: s2uc check-auth --s2cs 10.0.0.2:5000 --server-cert server.crt")
@option("--s2cs", default=None, metavar="HOST:PORT",
        help="Also ask this S2CS whether it accepts the token.")
@channel_options
@handle_errors("check-auth")
def check_auth(s2cs: str | None, server_cert: str | None, insecure: bool, token: str | None) -> None:
    """Show the stored logins; with --s2cs, check that the S2CS accepts the token."""
    try:
        infos = flows.logins()
    except AuthConfigError as exc:
        die(f"[red]{escape(str(exc))}[/]", Exit.USAGE)
    if infos:
        table = Table("login", "scope", "expires", "refresh")
        for i in infos:
            exp = "expired" if i.expires_in <= 0 else _when(i.expires_in)
            table.add_row(i.namespace, i.scope, exp, "yes" if i.refreshable else "no")
        out.print(table)
    elif s2cs is None:
        die(f"[red]not logged in[/]: run `s2uc login` (settings: {settings_path()})", Exit.LOGIN)
    if s2cs is None:
        return
    if (sent := resolve_token(token, s2cs)) is None:
        die(f"[red]no token for {escape(s2cs)}[/]: run `s2uc login --s2cs {escape(s2cs)}` "
            "(or pass --token / SCISTREAM_TOKEN)", Exit.LOGIN)
    try:
        n = asyncio.run(_probe(s2cs, ChannelOptions(server_cert=server_cert, insecure=insecure, token=sent)))
    except ScistreamError as exc:
        fail(f"check-auth with {s2cs}", exc)
    out.print(f"S2CS {escape(s2cs)} accepts the token ({n} sessions of yours there).")


auth_commands = [login, logout, check_auth]

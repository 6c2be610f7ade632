"""``s2uc``: the SciStream user client.

The original tooling's commands, arguments and output, on top of ``scistream.client``:

    s2uc prod-req --s2cs 10.0.0.2:5000 --num-conn 4           # PROD side: uid, listeners
    s2uc cons-req --s2cs 10.1.0.2:5000 UID 10.0.0.2:5100,...  # CONS side: consumer listeners
    s2uc release UID --s2cs 10.0.0.2:5000
    s2uc prod-req --s2cs 10.0.0.2:5000,10.0.0.3:5000   # a facility of two instances: one may be down

``--s2cs`` names one control server, or several instances of one facility's,
comma-separated (IPv6 in brackets: ``[2001:db8::2]:5000``): a call that finds one
unreachable goes to the next (``scistream.client.instances``). The session file keeps
the whole list, so ``s2uc release UID`` and ``s2uc status UID`` without ``--s2cs`` use
every instance.
"""
from __future__ import annotations

import asyncio
import json
import uuid

import click
from rich.markup import escape

from .. import __version__
from ..addr import format_listener
from ..appctrl.controller import MOCK_ENDPOINTS
from ..client import AsyncClient
from ..client import sessionfile
from ..client.instances import BadInstances, join_instances
from ..client.order import (ORIGINAL_SERVER, BadTargets, check_targets, original_server_note,
                            req_and_hello, session_of, wan_security_of)
from ..errors import LocalMistake, ScistreamError
from .common import (EXIT_CODES_HELP, channel_options, client, err, error_label, exit_code, handle_errors,
                     local_uid, option, out, remember)
from .s2uc_auth import auth_commands
from .s2uc_connect import connect_commands
from .s2uc_status import status_commands


def _split(values: tuple[str, ...] | list[str]) -> list[str]:
    """Listener arguments: comma-separated, space-separated, or both (the original's forms).

    An empty or malformed list is refused here (exit code 2), before anything is sent: the
    original's server crashes on an update without targets."""
    items = [v.strip() for arg in values for v in arg.replace(" ", ",").split(",") if v.strip()]
    return check_targets(items, "PROD_LISTENER")


def _note_wan(role: str, s2cs: str, upd) -> None:
    """Say so when the server turned out to be an original one: the WAN leg is plaintext."""
    if wan_security_of(upd) == ORIGINAL_SERVER:
        err.print(f"[yellow]note[/]: {escape(original_server_note(role, s2cs))}")


def _proto_lines(field: str, values) -> None:
    for v in values:
        out.print(f'{field}: "{escape(v)}"')


S2CS_HELP = ("The control server to talk to; several instances of one facility's as "
             "HOST:PORT,HOST:PORT (tried in order while one is unreachable).")


s2cs_option = option("--s2cs", required=True, metavar="HOST:PORT[,...]", envvar="SCISTREAM_S2CS",
                     help=S2CS_HELP)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="s2uc")
def cli() -> None:
    """SciStream user client: request, connect and release streaming sessions."""


# -- PROD side -------------------------------------------------------------------------
async def _prod_req(c: AsyncClient, uid: str, num_conn: int, rate: int, lease: int, mock: bool,
                    s2cs: str) -> None:
    def header() -> None:
        out.print("uid; s2cs; access_token; role")
        out.print(f"{uid} {s2cs} - PROD")
        out.print("waiting for hello message")
    if mock:
        header()
        resp = await req_and_hello(c, uid, "PROD", c.req(uid, "PROD", num_conn, rate, lease=lease),
                                   MOCK_ENDPOINTS)
    else:
        # the uid is shown once the server took the req (reachable, certificate, token, ports
        # all fine), not before: a uid printed for a req that then failed would be copied for nothing
        req = asyncio.ensure_future(c.req(uid, "PROD", num_conn, rate, lease=lease))
        try:
            await session_of(c, uid, "PROD", req=req)
        except BaseException:
            req.cancel()
            await asyncio.gather(req, return_exceptions=True)
            raise
        header()
        resp = await req
    remember(uid, "PROD", c.address, c.opts, wan_secret=resp.wan_secret, listeners=list(resp.listeners))
    _proto_lines("listeners", resp.listeners)
    _proto_lines("prod_listeners", resp.prod_listeners)
    if not mock and len(resp.prod_listeners) != num_conn:
        err.print(f"[yellow]note[/]: the producer's controller announced {len(resp.prod_listeners)} "
                  f"endpoint(s) for the session's {num_conn} connection(s); start it with --num-conn "
                  f"{num_conn} (or give prod-req the --num-conn of the producer) so every connection "
                  "has an endpoint of its own")
    endpoints = check_targets(resp.prod_listeners, "the producer's endpoints (from its hello)", usage=False)
    out.print("Sending updated connection map information...")
    _note_wan("PROD", s2cs, await c.update(uid, "PROD", endpoints, resp.wan_secret))
    out.print(uid)


@cli.command("prod-req", epilog="Example: s2uc prod-req --s2cs 10.0.0.2:5000 --num-conn 4\n\n"
                                "Then start the producer's controller with the printed line:\n"
                                "appctrl create-appctrl UID S2CS - PROD 10.0.0.5")
@s2cs_option
@option("--num-conn", type=click.IntRange(1), default=5, show_default=True, help="Parallel connections.")
@option("--rate", type=click.IntRange(0), default=0, show_default=True,
        help="Bandwidth cap in kbit/s for the whole session (0: none).")
@option("--lease", type=click.IntRange(0), default=0, help="Session lifetime in seconds (0: the server's default).")
@option("--mock", is_flag=True, help="Send the producer's hello from here, with fixed test endpoints.")
@channel_options
@handle_errors("prod-req")
def prod_req(s2cs, num_conn, rate, lease, mock, server_cert, insecure, token) -> None:
    """Request the PROD side of a new session; wait for the producer's hello; push its endpoints.

    Once the server took the request, prints the new uid and the line to give the
    producer's application controller, then (after its hello) the PROD listeners, which
    cons-req needs."""
    s2cs = join_instances(s2cs)
    uid = str(uuid.uuid4())

    async def run() -> None:
        async with client(s2cs, server_cert, insecure, token, uid) as c:
            await _prod_req(c, uid, num_conn, rate, lease, mock, s2cs)
    asyncio.run(run())


@cli.command("inbound-request",
             epilog="Example: s2uc inbound-request --s2cs 127.0.0.1:5000 --num-conn 1 "
                    "--remote-ip 127.0.0.1 --receiver-ports 5074")
@s2cs_option
@option("--num-conn", type=click.IntRange(1), default=5, show_default=True, help="Parallel connections.")
@option("--rate", type=click.IntRange(0), default=0, show_default=True, help="kbit/s (0: no cap).")
@option("--remote-ip", required=True, help="The producer's address.")
@option("--receiver-ports", required=True, help="The producer's ports, comma-separated (e.g. 5074,5075).")
@option("--lease", type=click.IntRange(0), default=0, help="Session lifetime in seconds (0: the server's default).")
@channel_options
@handle_errors("inbound-request")
def inbound_request(s2cs, num_conn, rate, remote_ip, receiver_ports, lease, server_cert, insecure, token) -> None:
    """PROD side with explicit producer endpoints: req, hello and update in one go."""
    s2cs = join_instances(s2cs)
    endpoints = _endpoints(remote_ip, receiver_ports)
    uid = str(uuid.uuid4())

    async def run() -> None:
        async with client(s2cs, server_cert, insecure, token) as c:
            resp = await req_and_hello(c, uid, "PROD", c.req(uid, "PROD", num_conn, rate, lease=lease),
                                       endpoints)
            remember(uid, "PROD", c.address, c.opts, wan_secret=resp.wan_secret,
                     listeners=list(resp.listeners))
            targets = check_targets(resp.prod_listeners, "the producer's endpoints", usage=False)
            _note_wan("PROD", s2cs, await c.update(uid, "PROD", targets, resp.wan_secret))
            _proto_lines("listeners", resp.listeners)
            _proto_lines("prod_listeners", resp.prod_listeners)
            out.print(uid)
    asyncio.run(run())


def _endpoints(remote_ip: str, receiver_ports: str) -> list[str]:
    ports = [p.strip() for p in receiver_ports.split(",") if p.strip()]
    if not ports:
        raise BadTargets("--receiver-ports needs at least one port; nothing was sent")
    eps = []
    for p in ports:
        if not p.isdigit():
            raise BadTargets(f"--receiver-ports: {p!r} is not a port number; nothing was sent")
        eps.append(format_listener(remote_ip, int(p)))
    return check_targets(eps, "--remote-ip/--receiver-ports")


# -- CONS side -------------------------------------------------------------------------
@cli.command("cons-req", epilog="Example: s2uc cons-req --s2cs 10.1.0.2:5000 UID 10.0.0.2:5100,10.0.0.2:5101")
@s2cs_option
@click.argument("uid")
@click.argument("prod_listener", nargs=-1, required=True)
@option("--num-conn", type=click.IntRange(1), default=None, help="Default: one per PROD listener.")
@option("--rate", type=click.IntRange(0), default=0, show_default=True, help="kbit/s (0: no cap).")
@option("--lease", type=click.IntRange(0), default=0, help="Session lifetime in seconds (0: the server's default).")
@option("--wan-secret-file", type=click.Path(dir_okay=False), default=None,
        help="JSON session file from the PROD side's client (default: this user's local record).")
@channel_options
@handle_errors("cons-req")
def cons_req(**kw) -> None:
    """Request the CONS side of session UID; wait for the consumer's hello; connect it to PROD_LISTENER(s)."""
    _cons_command(send_hello=False, **kw)


@cli.command("outbound-request",
             epilog="Example: s2uc outbound-request --s2cs 127.0.0.1:5001 --num-conn 1 "
                    "--remote-ip 127.0.0.1 --receiver-ports 5074 UID 127.0.0.1:5100")
@s2cs_option
@option("--num-conn", type=click.IntRange(1), default=None, help="Default: one per PROD listener.")
@option("--rate", type=click.IntRange(0), default=0, show_default=True, help="kbit/s (0: no cap).")
@option("--remote-ip", default=None, help="Accepted for the original's scripts; not needed.")
@option("--receiver-ports", default=None, help="Accepted for the original's scripts; not needed.")
@option("--lease", type=click.IntRange(0), default=0, help="Session lifetime in seconds (0: the server's default).")
@option("--wan-secret-file", type=click.Path(dir_okay=False), default=None,
        help="JSON session file from the PROD side's client (default: this user's local record).")
@click.argument("uid")
@click.argument("prod_listener", nargs=-1, required=True)
@channel_options
@handle_errors("outbound-request")
def outbound_request(remote_ip, receiver_ports, **kw) -> None:
    """CONS side with no consumer controller: req, hello and update in one go."""
    _cons_command(send_hello=True, **kw)


def _cons_command(s2cs, uid, prod_listener, num_conn, rate, lease, wan_secret_file, server_cert, insecure, token,
                  send_hello: bool) -> None:
    """cons-req (the consumer's controller says hello) and outbound-request (this client does)."""
    s2cs = join_instances(s2cs)
    local_uid(uid)
    listeners = _split(prod_listener)
    _import_secret(uid, wan_secret_file)

    async def run() -> list[str]:
        async with client(s2cs, server_cert, insecure, token, uid) as c:
            if not send_hello:
                out.print("waiting for hello message")
            if not (secret := sessionfile.wan_secret(uid)):
                err.print(f"[yellow]note[/]: no WAN secret for {uid} in {sessionfile.sessions_dir()} "
                          "(prod-req and inbound-request keep it there, or pass --wan-secret-file); the "
                          "CONS S2CS will refuse unless it allows a plaintext WAN leg")
            req = c.req(uid, "CONS", num_conn or len(listeners), rate, lease=lease)
            # the original's outbound-request says PROD in this hello; every server accepts that
            resp = await (req_and_hello(c, uid, "PROD", req) if send_hello else req)
            remember(uid, "CONS", c.address, c.opts)
            _note_wan("CONS", s2cs, await c.update(uid, "CONS", listeners, secret))
            return list(resp.listeners)
    out.print(f"Listeners: {asyncio.run(run())}")


def _import_secret(uid: str, path: str | None) -> None:
    if path is None:
        return
    try:
        data = json.loads(open(path).read())
    except (OSError, ValueError) as exc:
        raise LocalMistake(f"cannot read --wan-secret-file {path}: {exc}; nothing was sent") from None
    import base64
    sessionfile.save(uid, wan_secret=base64.b64decode(data.get("wan_secret", "")))


# -- release / status ------------------------------------------------------------------
@cli.command("release", epilog="Example: s2uc release UID --s2cs 10.0.0.2:5000\n\n"
                               "Without --s2cs: every side of UID this client set up (prod-req, "
                               "cons-req, connect...), each with the certificate it was reached with.")
@click.argument("uid")
@option("--s2cs", default=None, metavar="HOST:PORT[,...]", envvar="SCISTREAM_S2CS",
        help=S2CS_HELP + " Default: the one(s) this client used for UID.")
@channel_options
@handle_errors("release")
def release(uid, s2cs, server_cert, insecure, token) -> None:
    """Release session UID on its control server(s): stop its data servers, free its ports.

    With --s2cs, on that control server (its certificate, if not given, as this client
    recorded it for UID); without, on every side of UID this client set up.

    With several instances, a release whose attempt failed mid-call on one instance and
    that the next one answers NOT_FOUND is taken as done (the first attempt may have
    released it): a note says so and the exit code is 0."""
    local_uid(uid)
    if s2cs is None:
        targets = [side["s2cs"] for side in sessionfile.sides(uid).values()]
        if not targets:
            raise BadInstances(f"give the control server with --s2cs HOST:PORT; this client has no "
                               f"record of session {uid}")
    else:
        targets = [join_instances(s2cs)]
    targets = list(dict.fromkeys(targets))

    async def one(target: str) -> str:
        async with client(target, server_cert, insecure, token, uid) as c:
            await c.release(uid)
            return c.note

    async def run() -> list:
        return await asyncio.gather(*(one(t) for t in targets), return_exceptions=True)
    done, failed = [], []
    for target, r in zip(targets, asyncio.run(run())):
        if isinstance(r, BaseException):
            failed.append((target, r))
            continue
        if r:
            err.print(f"[yellow]note[/]: {escape(r)}")
        sessionfile.drop_side(uid, target)
        done.append(target)
    if len(targets) == 1:
        if failed:
            raise failed[0][1]
        out.print("Release completed")
        return
    for target, exc in failed:
        if not isinstance(exc, ScistreamError):
            raise exc
        err.print(f"[red]release failed[/] on {escape(target)} ({error_label(exc)}): {escape(str(exc))}")
    if done:
        out.print(f"Release completed: {' and '.join(done)}")
    if failed:
        raise SystemExit(max(exit_code(e) for _, e in failed))  # type: ignore[arg-type]


for _command in (*auth_commands, *status_commands, *connect_commands):
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="s2uc")


if __name__ == "__main__":
    main()

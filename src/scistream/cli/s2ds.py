"""``s2ds``: the data-plane node service of a gateway (every Builtin session of the node).

    s2ds serve --socket /run/scistream/node.sock --workers 4    # run it (systemd: deploy/s2ds.service)
    s2ds status --socket /run/scistream/node.sock               # workers, sessions
    s2ds restart --socket /run/scistream/node.sock              # a new service takes over, no refused connection
    s2ds stop --socket /run/scistream/node.sock

``s2cs`` starts and supervises one by itself (``STATE_DIR/node.sock``); run it on its own
and give ``s2cs --data-service SOCKET`` to manage it separately. Deliberately light: no
grpc here, the service is a data-plane process.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import click

SOCKET_HELP = "The service's control socket (Unix, mode 0600)."


EXIT_CODES_HELP = ("Exit codes: 0 ok; 1 refused by the service; 2 usage or configuration mistake; "
                   "4 the service is unreachable or busy, retry; 5 a restart failed (the old service "
                   "goes on).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(package_name="scistream", prog_name="s2ds")
def main() -> None:
    """The SciStream data-plane node service."""


cli = main  # the name every program's group has (scripts/gen-cli-docs, tests/test_docs.py)


_socket_option = click.option("--socket", "socket_path", type=click.Path(dir_okay=False, path_type=Path),
                              required=True, help=SOCKET_HELP)


@main.command(epilog="Example: s2ds serve --socket /run/scistream/node.sock --workers 4")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=SOCKET_HELP + " Default with --state-dir: STATE_DIR/node.sock.")
@click.option("--workers", type=int, default=0, show_default=True,
              help="Worker processes (0: one per core this process may run on).")
@click.option("--plain-relay", type=click.Choice(["auto", "splice", "copy"]), default="auto", show_default=True,
              help="How plain legs move bytes: auto copies on loopback legs and splices elsewhere.")
@click.option("--fresh", is_flag=True, help="Do not take over from a service running on --socket.")
@click.option("--store", default=None, metavar="URL",
              help="Join a facility: register in its PostgreSQL store (postgresql://...) and take "
                   "sessions from its control servers (s2cs --facility).")
@click.option("--node-name", default=None, help="--store: this node's name in the facility (default: the host name).")
@click.option("--address", default=None, help="--store: the address this node's session listeners carry.")
@click.option("--control", default=None, metavar="HOST:PORT",
              help="--store: where the control servers reach this node (TLS; default: ADDRESS:5050; "
                   "port 0: any free port, registered as bound).")
@click.option("--port-range", default="5100-5200", show_default=True, help="--store: ports for session listeners.")
@click.option("--max-rate", type=click.IntRange(0), default=0, show_default=True,
              help="--store: bandwidth this node admits, kbit/s (0: unlimited).")
@click.option("--max-sessions", type=click.IntRange(0), default=0, show_default=True,
              help="--store: most sessions on this node (0: no limit).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="--store: the facility's node token (mode 0600); only holders may drive this node.")
@click.option("--heartbeat", type=click.FloatRange(0.1), default=2.0, show_default=True,
              help="--store: seconds between heartbeats.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the node keeps its control certificate (--store) and, without --socket, its "
                   "socket (default: the socket's directory).")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def serve(socket_path: Path, workers: int, plain_relay: str, fresh: bool, store: str | None,
          node_name: str | None, address: str | None, control: str | None, port_range: str, max_rate: int,
          max_sessions: int, token_file: Path | None, heartbeat: float, state_dir: Path | None,
          verbose: bool) -> None:
    """Run the service in the foreground until SIGTERM/SIGINT (or `s2ds stop`).

    If a service already answers on --socket, this one takes over its sessions and
    listening sockets (an upgrade without refusing a connection), unless --fresh.
    With --store the node joins a facility of several nodes (docs/operator-guide.md)."""
    from ..data.node.service import default_workers, serve as run
    if workers < 0:
        raise click.UsageError("--workers must be >= 0")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s s2ds[%(process)d] %(levelname)s %(message)s")
    if socket_path is None:
        if state_dir is None:
            raise click.UsageError("give --socket PATH (or --state-dir DIR: the socket is DIR/node.sock)")
        socket_path = state_dir / "node.sock"
    socket_path = socket_path.absolute()
    member = None
    if store is not None:
        member = _membership(store, node_name, address, control, port_range, max_rate, max_sessions,
                             token_file, heartbeat, state_dir or socket_path.parent)
    try:
        socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise click.ClickException(f"cannot create {socket_path.parent}: {exc}") from None
    from ..control.store import StoreError
    try:
        code = asyncio.run(run(socket_path, workers or default_workers(), take_over=not fresh,
                                   plain_relay=plain_relay, member=member))
    except StoreError as exc:
        click.echo(f"s2ds: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        raise click.ClickException(f"cannot serve on {socket_path}: {exc}") from None
    sys.exit(code)


def _membership(store, node_name, address, control, port_range, max_rate, max_sessions, token_file,
                heartbeat, state_dir) -> dict:
    """The checked facility options (the Membership is made inside the event loop)."""
    import ipaddress
    import socket as socketlib
    from ..addr import parse_listener
    from ..control.pgstore import is_postgres_url, redact
    from ..control.ports import parse_port_range
    from ..data.node.facility import read_token
    from ..errors import InvalidArgument
    if not is_postgres_url(store):
        raise click.UsageError(f"--store {redact(store)}: give a postgresql://USER@HOST[:PORT]/DATABASE URL")
    if address is None:
        raise click.UsageError("--store needs --address: the address this node's session listeners carry")
    try:
        ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        raise click.UsageError(f"--address {address!r}: give this node's IP address") from None
    if token_file is None:
        raise click.UsageError("--store needs --token-file: the facility's node token")
    try:
        token = read_token(token_file)
    except (OSError, ValueError) as exc:
        raise click.UsageError(f"--token-file: {exc}") from None
    try:
        if not control:
            host, port = address.strip("[]"), 5050
        elif control.endswith(":0"):     # any free port: the node registers the one it got
            host, port = parse_listener(control[:-1] + "1")[0], 0
        else:
            host, port = parse_listener(control)
    except Exception as exc:  # noqa: BLE001 - the parser's message says what is wrong
        raise click.UsageError(f"--control: {exc}") from None
    try:
        ports = parse_port_range(port_range)
    except InvalidArgument as exc:
        raise click.UsageError(f"--port-range: {exc}") from None
    return dict(store_url=store, name=node_name or socketlib.gethostname(), address=address.strip("[]"),
                control=(host, int(port)), port_range=ports, max_rate=max_rate, max_sessions=max_sessions,
                token=token, heartbeat=heartbeat, state_dir=Path(state_dir).absolute())


def _call(socket_path: Path, msg: dict, timeout: float = 5.0) -> dict:
    from ..data.node.client import ServiceError, call_once
    try:
        return asyncio.run(call_once(socket_path, msg, timeout))
    except ServiceError as exc:
        click.echo(f"s2ds: {exc}", err=True)
        sys.exit(4 if exc.code in ("unreachable", "busy") else 1)


@main.command(epilog="Example: s2ds status --socket /run/scistream/node.sock --json")
@_socket_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def status(socket_path: Path, as_json: bool) -> None:
    """Workers and sessions of a running service."""
    reply = _call(socket_path, {"op": "status"})
    if as_json:
        click.echo(json.dumps(reply, indent=1))
        return
    click.echo(f"node service pid {reply['pid']}: {reply['sessions']} sessions")
    for w in reply["workers"]:
        spin = w.get("spin")
        spun = (f"; spin {spin['us']} us: {spin['hits']} met an event, {spin['missed']} ran out, "
                f"{spin['gave_way']} gave way" if spin and spin.get("us") else "; no spin" if spin else "")
        carried = w.get("carried")
        carry = (f"; in C: {carried['connections']} connections, {carried['events']} events"
                 if carried and carried.get("events") is not None else "")
        click.echo(f"  worker {w['index']}: pid {w['pid']}, {w['sessions']} sessions, {w['listeners']} listeners, "
                   f"{w['restarts']} restarts{'' if w['alive'] else ' (restarting)'}{spun}{carry}")


@main.command(epilog="Example: s2ds restart --socket /run/scistream/node.sock")
@_socket_option
@click.option("--workers", type=int, default=None, help="Workers of the new service (default: as the running one).")
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Log file of the new service (default: the running one's standard error).")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for the takeover.")
def restart(socket_path: Path, workers: int | None, log_path: Path | None, timeout: float) -> None:
    """Start a new service that takes over from the running one (e.g. after an upgrade).

    Listening sockets are handed over: no new connection is refused. Established
    connections of the old workers are reset."""
    old = _call(socket_path, {"op": "ping"})
    argv = list(old.get("argv") or [])
    if workers is None:
        workers = len(old.get("workers") or []) or 0
    cmd = [sys.executable, "-m", "scistream.cli.s2ds", "serve", "--socket", str(socket_path.absolute()),
           "--workers", str(workers)]
    if "--verbose" in argv or "-v" in argv:
        cmd.append("--verbose")
    # the rest of the running service's options (a facility member's --store, --node-name, ...)
    passed = ("--plain-relay", "--store", "--node-name", "--address", "--control", "--port-range",
              "--max-rate", "--max-sessions", "--token-file", "--heartbeat", "--state-dir")
    for i, arg in enumerate(argv[:-1]):
        if arg in passed:
            cmd += [arg, argv[i + 1]]
    if log_path is None:   # the running one's standard error, if it is a file
        with contextlib.suppress(OSError):
            log_path = Path(os.readlink(f"/proc/{old['pid']}/fd/2"))
        log_path = log_path if log_path and log_path.is_file() else None
    with open(log_path, "ab") if log_path else contextlib.nullcontext(subprocess.DEVNULL) as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            click.echo(f"s2ds: the new service exited with code {proc.returncode}", err=True)
            sys.exit(5)
        from ..data.node.client import ServiceError, call_once
        with contextlib.suppress(ServiceError):
            reply = asyncio.run(call_once(socket_path, {"op": "ping"}, 2.0))
            if reply.get("pid") == proc.pid:
                click.echo(f"node service restarted: pid {old['pid']} -> {proc.pid}, "
                           f"{reply.get('sessions')} sessions taken over")
                return
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    click.echo(f"s2ds: the new service (pid {proc.pid}) did not take over within {timeout:g} s", err=True)
    sys.exit(4)


@main.command(epilog="Example: s2ds stop --socket /run/scistream/node.sock")
@_socket_option
def stop(socket_path: Path) -> None:
    """Stop the service (every session it carries stops)."""
    _call(socket_path, {"op": "shutdown"})
    click.echo("node service stopping")


if __name__ == "__main__":
    main()

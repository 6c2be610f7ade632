"""``s2uc connect`` and ``s2uc disconnect``: a whole session in one command.

``connect`` is ``scistream.client.connect`` with a face: it creates the uid, prints the
two ``appctrl`` lines the application controllers must be started with (or starts the
bundled demo apps itself with ``--start-apps``), shows which step it is at while it
waits for both hellos, pushes both connection maps and prints the consumer's listeners
(``--json``: one JSON document instead). Ctrl-C or SIGTERM releases whatever was set up,
on both sides, and stops the apps it started.

    s2uc connect --prod-s2cs 10.0.0.2:5000 --cons-s2cs 10.1.0.2:5000 --num-conn 4
    s2uc connect --prod-s2cs 127.0.0.1:5000 --cons-s2cs 127.0.0.1:5001 --start-apps --size 1G --json
    s2uc disconnect UID --prod-s2cs 10.0.0.2:5000 --cons-s2cs 10.1.0.2:5000
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import tempfile
import time
from pathlib import Path

from typing import NoReturn

import click
from rich.live import Live
from rich.markup import escape
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from ..client import Connection, Gateway, Progress, Step, connect as connect_session, new_uid
from ..client import release as release_session
from ..client import sessionfile
from ..errors import LocalMistake, ScistreamError
from ..procs import ChildExited, exe, spawn, tail_text, until_done
from .common import (EXIT_CODES_HELP, SIZE_OPTION_HELP, Exit, Size, channel, die, err, exit_code, fail,
                     handle_errors, local_uid, option, out, remember, stacked, verbose_option)

# -- the two gateways ------------------------------------------------------------------
def _gateway(s2cs: str, cert: str | None, insecure: bool, token: str | None, uid: str | None) -> Gateway:
    opts = channel(s2cs, cert and os.path.abspath(cert), insecure, token, uid)
    return Gateway(s2cs, server_cert=opts.server_cert, insecure=opts.insecure, token=opts.token,
                   server_cert_pem=opts.cert_pem)


def _gateways(prod_s2cs, cons_s2cs, server_cert, prod_cert, cons_cert, insecure, token,
              uid: str | None = None) -> tuple[Gateway, Gateway]:
    return (_gateway(prod_s2cs, prod_cert or server_cert, insecure, token, uid),
            _gateway(cons_s2cs, cons_cert or server_cert, insecure, token, uid))


def two_sides(fn=None, *, required: bool = True):
    """--prod-s2cs/--cons-s2cs and how to reach each: shared and per-side certificates."""
    recorded = "" if required else " Default: the one this client recorded for UID."
    deco = stacked(
        option("--prod-s2cs", required=required, metavar="HOST:PORT[,...]", envvar="SCISTREAM_PROD_S2CS",
               help="The producer facility's control server (several instances: HOST:PORT,HOST:PORT, "
                    "tried in order while one is unreachable)." + recorded),
        option("--cons-s2cs", required=required, metavar="HOST:PORT[,...]", envvar="SCISTREAM_CONS_S2CS",
               help="The consumer facility's control server (several instances: as --prod-s2cs)." + recorded),
        option("--server-cert", "--server-crt", default=None, envvar="SCISTREAM_SERVER_CERT", show_envvar=True,
               help="PEM certificate to verify both S2CS against (default: ./server.crt if present, "
                    "else the system's roots)."),
        option("--prod-server-cert", default=None, metavar="PEM",
               help="The PROD S2CS's certificate, when it differs (overrides --server-cert)."),
        option("--cons-server-cert", default=None, metavar="PEM",
               help="The CONS S2CS's certificate, when it differs (overrides --server-cert)."),
        option("--insecure", is_flag=True, default=False,
               help="Plaintext control channels (only for servers started with --insecure)."),
        option("--token", envvar="SCISTREAM_TOKEN", default=None, show_envvar=True,
               help="Access token to send to both (default: each S2CS's from `s2uc login`)."),
        verbose_option)
    return deco if fn is None else deco(fn)


def appctrl_line(uid: str, g: Gateway, role: str, *, producer_ip: str = "127.0.0.1", num_conn: int = 1,
                 extra: list[str] | None = None) -> list[str]:
    """The command an application controller is started with for this session."""
    argv = ["appctrl", "create-appctrl", uid, g.address, "-", role]
    if role == "PROD":
        argv += [producer_ip, "--num-conn", str(num_conn)]
    argv += extra or []
    if g.insecure:
        argv.append("--insecure")
    elif g.server_cert:
        argv += ["--server-cert", g.server_cert]
    return argv


# -- progress display ------------------------------------------------------------------
class Display:
    """Which step, how long: a live view on a terminal, one line per step otherwise."""
    SHOWN = {  # step: (headline, or None to keep it; what each side is at)
        Step.REQUESTED: ("waiting for both application controllers' hellos", {
            "PROD": "waiting for the producer's hello", "CONS": "waiting for the consumer's hello"}),
        Step.PROD_HELLO: (None, {"PROD": "hello received; pushing the connection map"}),
        Step.PROD_CONNECTED: (None, {"PROD": "connected"}),
        Step.CONS_HELLO: (None, {"CONS": "hello received; waiting for the PROD side"}),
        Step.CONNECTED: ("connected", {"CONS": "connected"}),
        Step.RELEASING: ("releasing what was set up", {}),
        Step.RELEASED: ("released: {detail}", {"PROD": "released", "CONS": "released"}),
    }

    def __init__(self, uid: str, prod: Gateway, cons: Gateway, *, live: bool) -> None:
        self.uid, self.prod, self.cons = uid, prod, cons
        self.start = time.monotonic()
        self.headline = "sending req to both control servers"
        self.side = {"PROD": "sending req", "CONS": "sending req"}
        self.spinner = Spinner("dots")
        self.live = Live(self, console=err, refresh_per_second=8, transient=False,
                         redirect_stdout=False, redirect_stderr=False) if live else None

    def __rich__(self) -> Table:
        grid = Table.grid(padding=(0, 1))
        grid.add_row(self.spinner, Text(f"{self.headline}  ({time.monotonic() - self.start:.1f} s)"))
        for role, g in (("PROD", self.prod), ("CONS", self.cons)):
            grid.add_row("", Text(f"{role} {g.address}: {self.side[role]}"))
        return grid

    def __call__(self, p: Progress) -> None:
        headline, sides = self.SHOWN[p.step]
        self.headline = headline.format(detail=p.detail) if headline else self.headline
        self.side.update(sides)
        if self.live is None:
            err.print(f"[{p.elapsed:6.2f} s] {p.step.value}: {escape(p.detail)}")

    def note(self, text: str) -> None:
        self.headline = text
        if self.live is None:
            err.print(f"[{time.monotonic() - self.start:6.2f} s] {escape(text)}")

    def __enter__(self) -> "Display":
        if self.live is not None:
            self.live.start()
        return self

    def stop(self) -> None:
        if self.live is not None and self.live.is_started:
            self.live.stop()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- the demo apps (--start-apps) ------------------------------------------------------
class AppFailed(ChildExited):
    """An application controller started by --start-apps failed."""


def _child_env(token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SCISTREAM_TOKEN"}
    return {**env, "SCISTREAM_TOKEN": token} if token else env   # not in argv: argv is visible to every user


async def _with_apps(prod: Gateway, cons: Gateway, uid: str, *, num_conn: int, rate: int, lease: int,
                     size: int, producer_ip: str, hello_timeout: float | None,
                     display: Display) -> tuple[Connection, dict]:
    """Start the demo producer and consumer, connect them, wait for the verified transfer."""
    size -= size % num_conn   # every connection carries as much
    async with contextlib.AsyncExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="s2uc-connect-")))   # removed last
        task = asyncio.create_task(connect_session(prod, cons, num_conn=num_conn, rate=rate, lease=lease,
                                                   uid=uid, hello_timeout=hello_timeout,
                                                   on_progress=display))
        stack.push_async_callback(_cancel, task)
        report = work / "consumer.json"
        pargv = appctrl_line(uid, prod, "PROD", producer_ip=producer_ip, num_conn=num_conn,
                             extra=["--size", str(size), "--connections", str(num_conn)])
        cargv = appctrl_line(uid, cons, "CONS", extra=["--size", str(size), "--report", str(report)])
        producer = await stack.enter_async_context(
            spawn([exe("appctrl"), *pargv[1:]], log_path=work / "producer.log", env=_child_env(prod.token)))
        consumer = await stack.enter_async_context(
            spawn([exe("appctrl"), *cargv[1:]], log_path=work / "consumer.log", env=_child_env(cons.token)))
        apps = {producer: ("producer's controller", work / "producer.log"),
                consumer: ("consumer's controller", work / "consumer.log")}
        conn = await until_done(task, apps, AppFailed)
        try:
            display.note(f"connected; the demo apps are streaming {size} bytes")
            rc = await consumer.wait()
            if rc != 0:
                raise AppFailed(f"the consumer failed (exit {rc}): {tail_text(work / 'consumer.log')}")
            result = json.loads(report.read_text())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(producer.wait(), 30)
        finally:
            released = await release_session(conn)
            display.note("released on both sides")
        result["released"] = released.to_dict()
        return conn, result


async def _cancel(task: asyncio.Task) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(BaseException):
        await task


# -- the command -----------------------------------------------------------------------
async def _main(run, show, hold: bool, interrupted: dict) -> object:
    """Run with Ctrl-C and SIGTERM cancelling the work, which releases the session.

    Our own handlers, not asyncio.run's: they also work where SIGINT was ignored (a
    background job), and a second signal does not interrupt the release."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal(sig: signal.Signals) -> None:
        if "signal" in interrupted:
            err.print("[yellow]still releasing what was set up; please wait[/]")
            return
        interrupted["signal"] = sig.name
        me.cancel()  # type: ignore[union-attr]
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
    try:
        result = await run()
        show(result)
        if hold:
            try:
                await asyncio.Event().wait()  # until Ctrl-C or SIGTERM
            except asyncio.CancelledError:  # the expected end of --hold
                interrupted["held"] = True
            finally:
                released = await release_session(result)
            err.print(f"session {result.uid} released ({interrupted.get('signal')}): "
                      f"PROD {'freed' if released.prod else 'held nothing'}, "
                      f"CONS {'freed' if released.cons else 'held nothing'}")
        return result
    finally:
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


def _print_connection(conn: Connection, prod: Gateway, cons: Gateway, started_apps: bool) -> None:
    out.print(f"connected in {conn.setup_seconds:.2f} s (WAN leg {conn.wan_security})")
    out.print(f"producer endpoints: {' '.join(conn.producer_endpoints)}")
    out.print(f"PROD WAN listeners: {' '.join(conn.wan_listeners)}")
    out.print(f"consumer listeners: {' '.join(conn.consumer_listeners)}")
    if not started_apps:
        out.print("release with: " + shlex.join(disconnect_line(conn.uid, prod, cons)), markup=False)
        out.print(f"  (or: s2uc disconnect {conn.uid}, which finds both in this client's session file)",
                  markup=False)


def disconnect_line(uid: str, prod: Gateway, cons: Gateway) -> list[str]:
    """The full `s2uc disconnect` command for this session: it works as printed, anywhere."""
    argv = ["s2uc", "disconnect", uid, "--prod-s2cs", prod.address, "--cons-s2cs", cons.address]
    if prod.insecure or cons.insecure:
        argv.append("--insecure")
    for flag, g in (("--prod-server-cert", prod), ("--cons-server-cert", cons)):
        if g.server_cert and not g.insecure:
            argv += [flag, g.server_cert]
    return argv


@click.command("connect", epilog="""\b
Examples:
  s2uc connect --prod-s2cs 10.0.0.2:5000 --cons-s2cs 10.1.0.2:5000 --num-conn 4 \\
      --prod-server-cert prod.crt --cons-server-cert cons.crt
  s2uc connect --prod-s2cs 127.0.0.1:5000 --cons-s2cs 127.0.0.1:5001 --insecure \\
      --start-apps --size 1G --json
  s2uc connect --prod-s2cs 10.0.0.2:5000 --cons-s2cs 10.1.0.2:5000 --uid "$(uuidgen)" --hold

Without --start-apps, start the two application controllers with the lines it prints;
the session stays up after it exits (unless --hold): release it with `s2uc disconnect`.
Ctrl-C (or SIGTERM) while it waits releases both sides.

""" + EXIT_CODES_HELP + " 130: interrupted (everything released).")
@two_sides
@option("--num-conn", type=click.IntRange(1), default=1, show_default=True, help="Parallel connections.")
@option("--rate", type=click.IntRange(0), default=0, show_default=True,
        help="Bandwidth cap in kbit/s for the session on each side (0: none).")
@option("--lease", type=click.IntRange(0), default=0, help="Session lifetime in seconds (0: the servers' default).")
@option("--uid", default=None, help="Use this uid (a UUID) instead of a new one.")
@option("--hello-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
        help="Seconds to wait for the hellos (default: the servers' --hello-timeout).")
@option("--start-apps", is_flag=True,
        help="Start the bundled demo producer and consumer (appctrl processes), stream, verify every "
             "byte, then release both sides.")
@option("--size", type=Size(), default="64M", show_default=True,
        help="--start-apps: " + SIZE_OPTION_HELP)
@option("--producer-ip", default="127.0.0.1", show_default=True,
        help="The address the producer listens on (must be reachable from the PROD gateway).")
@option("--hold", is_flag=True, help="Stay until Ctrl-C or SIGTERM, then release both sides.")
@option("--json", "as_json", is_flag=True, help="Print one JSON document (progress goes to stderr).")
def connect(prod_s2cs, cons_s2cs, server_cert, prod_server_cert, cons_server_cert, insecure, token,
            num_conn, rate, lease, uid, hello_timeout, start_apps, size, producer_ip, hold, as_json) -> None:
    """Connect a producer's facility to a consumer's in one command: both requests, both
    hellos, both connection maps; print where the consumer connects."""
    interrupted: dict = {}
    try:
        prod, cons = _gateways(prod_s2cs, cons_s2cs, server_cert, prod_server_cert, cons_server_cert,
                               insecure, token)
        uid = local_uid(uid) if uid else new_uid()
        if start_apps and hold:
            raise LocalMistake("--hold and --start-apps do not go together: with --start-apps the "
                                  "session ends when the demo transfer is verified")
        if start_apps and size < num_conn:
            raise LocalMistake(f"--size {size} is less than one byte per connection (--num-conn {num_conn})")
    except ScistreamError as exc:
        _failed(exc, None, as_json)
    for role, g in (("PROD", prod), ("CONS", cons)):   # found by disconnect, release, status, appctrl
        remember(uid, role, g.address, g.options())
    say = err if as_json else out
    say.print(f"session {uid}: PROD S2CS {prod.address}, CONS S2CS {cons.address}, {num_conn} connection(s)")
    if not start_apps:
        say.print("start the application controllers with (the token: --token, SCISTREAM_TOKEN or `s2uc login`):")
        say.print("  " + shlex.join(appctrl_line(uid, prod, "PROD", producer_ip=producer_ip, num_conn=num_conn)),
                  markup=False)
        say.print("  " + shlex.join(appctrl_line(uid, cons, "CONS")), markup=False)
    display = Display(uid, prod, cons, live=err.is_terminal)

    async def run():
        if start_apps:
            return await _with_apps(prod, cons, uid, num_conn=num_conn, rate=rate, lease=lease, size=size,
                                    producer_ip=producer_ip, hello_timeout=hello_timeout, display=display)
        return await connect_session(prod, cons, num_conn=num_conn, rate=rate, lease=lease, uid=uid,
                                     hello_timeout=hello_timeout, on_progress=display)
    def show(result) -> None:
        display.stop()
        conn, transfer = result if isinstance(result, tuple) else (result, None)
        if as_json:
            doc = conn.to_dict()
            if transfer is not None:
                doc["transfer"] = transfer
            click.echo(json.dumps(doc, indent=2))
            return
        _print_connection(conn, prod, cons, start_apps or hold)
        if transfer is not None:
            gbps = transfer["bytes"] * 8 / transfer["seconds"] / 1e9 if transfer["seconds"] else 0.0
            out.print(f"consumer verified {transfer['bytes']} bytes over {transfer['streams']} connection(s) "
                      f"in {transfer['seconds']:.2f} s ({gbps:.2f} Gbit/s)")
            out.print("released PROD and CONS")
        elif hold:
            out.print("holding the session; Ctrl-C or SIGTERM releases both sides")

    try:
        with display:
            asyncio.run(_main(run, show, hold, interrupted))
        if start_apps or hold:
            sessionfile.forget(uid)   # released: nothing to remember
    except (KeyboardInterrupt, asyncio.CancelledError):
        sessionfile.forget(uid)
        sig = interrupted.get("signal", "SIGINT")
        if as_json:
            click.echo(json.dumps({"uid": uid, "error": {"code": "INTERRUPTED", "signal": sig,
                                                         "message": "interrupted; everything set up was released"}}))
        die(f"[yellow]connect interrupted ({sig})[/]: session {uid} released on both sides"
            + ("; the apps it started were stopped" if start_apps else ""), 130 if sig == "SIGINT" else 143)
    except ScistreamError as exc:
        sessionfile.forget(uid)
        _failed(exc, uid, as_json)
    except AppFailed as exc:
        sessionfile.forget(uid)
        if as_json:
            click.echo(json.dumps({"uid": uid, "error": {"code": "APP_FAILED", "message": str(exc)}}))
        die(f"[red]connect failed[/]: {escape(str(exc))}; session {uid} released on both sides", Exit.FAILED)


def _failed(exc: ScistreamError, uid: str | None, as_json: bool) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"uid": uid, "error": {"code": exc.status.name, "message": str(exc),
                                                     "exit": int(exit_code(exc))}}))
    fail("connect", exc)


@click.command("disconnect", epilog="Example: s2uc disconnect UID --prod-s2cs 10.0.0.2:5000 --cons-s2cs 10.1.0.2:5000\n\n"
                                    "Without --prod-s2cs/--cons-s2cs: the two this client recorded for UID "
                                    "(`s2uc connect` records them).\n\n" + EXIT_CODES_HELP)
@click.argument("uid")
@two_sides(required=False)
@option("--json", "as_json", is_flag=True, help="Print what was released as JSON.")
@handle_errors("disconnect")
def disconnect(uid, prod_s2cs, cons_s2cs, server_cert, prod_server_cert, cons_server_cert, insecure, token,
               as_json) -> None:
    """Release session UID on both control servers: stop its data servers, free its ports."""
    local_uid(uid)
    known = sessionfile.sides(uid)
    prod_s2cs = prod_s2cs or known.get("PROD", {}).get("s2cs")
    cons_s2cs = cons_s2cs or known.get("CONS", {}).get("s2cs")
    if not prod_s2cs or not cons_s2cs:
        raise LocalMistake(f"give --prod-s2cs and --cons-s2cs: this client has no record of "
                           f"{'session ' + uid if not known else 'both sides of session ' + uid}; nothing was sent")
    prod, cons = _gateways(prod_s2cs, cons_s2cs, server_cert, prod_server_cert, cons_server_cert, insecure,
                           token, uid)
    released = asyncio.run(release_session(uid, prod, cons))
    for g in (prod, cons):
        sessionfile.drop_side(uid, g.address)
    if as_json:
        click.echo(json.dumps(released.to_dict()))
        return
    sides = [s for s, ok in (("PROD", released.prod), ("CONS", released.cons)) if ok]
    out.print(f"Release completed: {' and '.join(sides)}"
              + ("" if len(sides) == 2 else f" ({'CONS' if released.prod else 'PROD'} held nothing)"))


connect_commands = [connect, disconnect]

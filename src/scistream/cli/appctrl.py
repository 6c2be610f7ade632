"""``appctrl``: the application controller next to a producer or a consumer.

    appctrl create-appctrl UID S2CS TOKEN PROD 10.0.0.5      # start the demo producer, say hello
    appctrl create-appctrl UID S2CS TOKEN CONS               # say hello, run the verifying consumer
    appctrl mock UID S2CS TOKEN PROD                         # hello with fixed test endpoints

TOKEN is the session owner's token; ``-`` takes it from --token, SCISTREAM_TOKEN or the
``s2uc login`` store. S2CS is one control server, or several instances of one facility's,
comma-separated (``10.0.0.2:5000,10.0.0.3:5000``): the hello goes to the next one while
one is unreachable (``scistream.client.instances``).
"""
from __future__ import annotations

import asyncio
import json
import shlex
import signal

import click
from rich.markup import escape

from .. import __version__
from ..appctrl.controller import MOCK_ENDPOINTS, UdpDemo, run_cons, run_prod
from ..appctrl.iperf3 import Iperf3Report
from ..apps.udpdemo import UdpReport
from ..apps.demo import VerifyError
from ..client import AsyncClient
from ..client.instances import join_instances
from ..client.order import hello_after_req, session_of
from .common import (EXIT_CODES_HELP, SIZE_OPTION_HELP, Exit, Size, channel_options, client, die, err,
                     handle_errors, local_uid, option, out, stacked)


def _client(uid: str, s2cs: str, token_arg: str, server_cert, insecure, token_opt) -> AsyncClient:
    """The controller's client of S2CS, its arguments checked first (a mistake: exit 2, nothing sent)."""
    local_uid(uid)
    s2cs = join_instances(s2cs, "S2CS")
    return client(s2cs, server_cert, insecure, token_opt or token_arg, uid)


async def _session_num_conn(c: AsyncClient, uid: str) -> int:
    """The PROD side's connection count, as its req asked (the server's status); 1 when the
    server cannot tell (the original tooling's has no status)."""
    info = await session_of(c, uid, "PROD")
    if info is None or not info.num_conn:
        err.print(f"[yellow]note[/]: cannot learn the session's connection count from {escape(c.address)}; "
                  "opening 1 producer endpoint (give --num-conn to match prod-req's)")
        return 1
    return info.num_conn


def _words(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="appctrl")
def cli() -> None:
    """SciStream application controller: announce an application's endpoints and start it."""


_hello_arguments = stacked(
    click.argument("uid"), click.argument("s2cs"), click.argument("access_token", metavar="TOKEN"),
    click.argument("role", metavar="PROD|CONS", type=click.Choice(["PROD", "CONS"], case_sensitive=False)),
    click.argument("controller_ip", required=False, default="127.0.0.1"))


@cli.command("create-appctrl",
             epilog="Examples:\n\n  appctrl create-appctrl UID 10.0.0.2:5000 - PROD 10.0.0.5 --size 1G\n\n"
                    "  appctrl create-appctrl UID 10.1.0.2:5000 - CONS --size 1G\n\n"
                    "CONTROLLER_IP (PROD): the address the producer listens on, which the PROD "
                    "gateway's data server connects to (default 127.0.0.1: producer and gateway on one "
                    "host). The PROD controller serves until Ctrl-C (or --connections N).")
@_hello_arguments
@option("--app", type=click.Choice(["demo", "iperf3", "none"]), default="demo", show_default=True,
        help="What to run: the bundled demo producer/consumer, iperf3, or nothing (hello only).")
@option("--num-conn", type=click.IntRange(1), default=None,
        help="PROD: how many producer endpoints to open (default: the session's connection count, "
             "as prod-req asked).")
@option("--size", type=Size(minimum=0), default="1G", show_default=True,
        help="Demo app: " + SIZE_OPTION_HELP + " Give PROD and CONS the same.")
@option("--connections", type=click.IntRange(1), default=None,
        help="PROD: exit after serving this many connections (iperf3: this many completed tests; a "
             "connection that was no test does not count) (default: serve until interrupted).")
@option("--endpoint", "endpoints", multiple=True, help="PROD with --app none: the producer's HOST:PORT (repeatable).")
@option("--connect-timeout", type=float, default=120.0, show_default=True,
        help="CONS: how long to wait for the listeners to accept connections (iperf3: for its test "
             "to start; the client is run again while its test has not started).")
@option("--iperf3-args", default="", metavar="ARGS", callback=lambda ctx, param, v: _words(v),
        help="CONS with --app iperf3: more arguments for the iperf3 client, e.g. '-t 30 -P 4' or "
             "'-n 1G -R' (it runs with -c, -p and --json).")
@option("--report", type=click.Path(dir_okay=False), default=None,
        help="CONS: also write the transfer report (JSON: bytes, seconds, streams, gbps) to this file.")
@option("--udp", is_flag=True,
        help="Demo app over UDP: the consumer opens a flow on each listener, the producer answers it "
             "with numbered datagrams (--size in all), the consumer checks each and reports loss and "
             "reordering. The session's data servers must carry UDP (Builtin, or Nginx on a plain leg).")
@option("--datagram-size", type=click.IntRange(21, 65000), default=1200, show_default=True,
        help="--udp: bytes per datagram. Give PROD and CONS the same.")
@option("--udp-rate", type=click.FloatRange(0), default=50.0, show_default=True,
        help="--udp, PROD: Mbit/s each flow is sent at (0: as fast as the producer can).")
@channel_options
@handle_errors("appctrl")
def create_appctrl(uid, s2cs, access_token, role, controller_ip, app, num_conn, size, connections, endpoints,
                   connect_timeout, iperf3_args, report, udp, datagram_size, udp_rate, server_cert, insecure,
                   **kw) -> None:
    """Say hello to the S2CS for session UID and run the application (PROD or CONS).

    S2CS is HOST:PORT, or HOST:PORT,HOST:PORT for several instances of one facility's
    control server (the next is tried while one is unreachable). CONTROLLER_IP (PROD only)
    is where the producer listens: the PROD gateway's data server connects there."""
    dgrams = UdpDemo(datagram_size, udp_rate) if udp else None

    async def run() -> None:
        # SIGTERM stops the controller as Ctrl-C does: cancelled, it stops its application first
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
        async with _client(uid, s2cs, access_token, server_cert, insecure, kw.get("token")) as c:
            if role == "PROD":
                n = num_conn or (await _session_num_conn(c, uid) if app == "demo" else 1)
                await run_prod(c, uid, controller_ip, app=app, num_conn=n, size=size,
                               endpoints=endpoints, connections=connections, say=out.print, udp=dgrams)
            else:
                result = await run_cons(c, uid, app=app, size=size, connect_timeout=connect_timeout,
                                        iperf_args=iperf3_args, say=out.print, udp=dgrams)
                if report and result is not None:
                    with open(report, "w") as f:
                        json.dump(_report(result), f)

    try:
        asyncio.run(run())
    except asyncio.CancelledError:
        die("[yellow]appctrl stopped (SIGTERM)[/]", 128 + signal.SIGTERM)
    except VerifyError as exc:
        die(f"[red]verification failed[/]: {exc}", Exit.FAILED)
    except (ConnectionError, OSError) as exc:
        die(f"[red]application failed[/]: {exc}", Exit.FAILED)


def _report(result) -> dict:
    if isinstance(result, UdpReport):
        return {"bytes": result.bytes, "seconds": result.seconds, "streams": len(result.flows),
                "datagrams": result.received, "lost": result.lost, "reordered": result.reordered,
                "duplicates": result.duplicates, "loss": result.loss,
                "gbps": result.bytes * 8 / result.seconds / 1e9 if result.seconds else 0.0}
    if isinstance(result, Iperf3Report):
        return {"bytes": result.bytes, "sent": result.sent, "seconds": result.seconds, "streams": result.streams,
                "gbps": result.gbps, "attempts": result.attempts}
    return {"bytes": result.bytes, "seconds": result.seconds, "streams": len(result.streams), "gbps": result.gbps}


@cli.command("mock", epilog="Example: appctrl mock UID 127.0.0.1:5000 - PROD --insecure")
@_hello_arguments
@channel_options
@handle_errors("appctrl mock")
def mock(uid, s2cs, access_token, role, controller_ip, server_cert, insecure, **kw) -> None:
    """Send a hello with fixed test endpoints (127.0.0.1:5074, 5075, 5076, 37000, 47000)."""
    async def run() -> None:
        async with _client(uid, s2cs, access_token, server_cert, insecure, kw.get("token")) as c:
            resp = await hello_after_req(c, uid, role, MOCK_ENDPOINTS if role == "PROD" else [])
            out.print(resp.message)
            if resp.listeners:
                out.print(f"Listeners: {list(resp.listeners)}")
    asyncio.run(run())


def main() -> None:
    cli(prog_name="appctrl")


if __name__ == "__main__":
    main()

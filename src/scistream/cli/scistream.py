"""``scistream``: project-level commands (the demo)."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import click

from .. import __version__
from ..data.base import backend_names
from ..demo import DemoOptions, run_demo
from ..errors import ScistreamError
from .common import SIZE_OPTION_HELP, Exit, Size, die, err, out, setup_logging

TYPES = backend_names()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="scistream")
def cli() -> None:
    """SciStream tools."""


@cli.command(epilog="Examples:\n\n  scistream demo --size 256M --num-conn 2\n\n  scistream demo --udp --size 64M")
@click.option("--size", type=Size(), default="1G", show_default=True, help=SIZE_OPTION_HELP)
@click.option("--num-conn", "--num_conn", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Parallel connections of the session (each carries --size / N bytes).")
@click.option("--type", "server_type", type=click.Choice(TYPES, case_sensitive=False), default="Builtin",
              show_default=True, help="Data server kind on both gateways.")
@click.option("--rate", type=click.IntRange(0), default=0, help="kbit/s cap per session (0: none).")
@click.option("--keep-dir", is_flag=True, help="Keep the work directory (logs, configs).")
@click.option("--netns", is_flag=True,
              help="As root: run the two facilities in network namespaces that cannot reach each other.")
@click.option("--wan-rtt", help="With --netns: an emulated WAN between the gateways, of this round trip (e.g. 50ms).")
@click.option("--wan-rate", help="With --netns: the emulated WAN's bottleneck (e.g. 1gbit, 200mbit) [1gbit].")
@click.option("--wan-loss", help="With --netns: the emulated WAN's loss, each way (e.g. 0.01%, 1e-4) [0].")
@click.option("--wan-mtu", type=click.IntRange(1280, 9000), help="With --netns: the emulated WAN's MTU [1500].")
@click.option("--wan-jitter", help="With --netns: +- on each one-way delay of the emulated WAN (e.g. 1ms) [0].")
@click.option("--wan-hosts", type=click.Choice(["advised", "typical"]), default=None,
              help="With --wan-rtt: the gateways' TCP as `s2cs check-config` advises for the WAN's round "
                   "trip and rate (advised, the default), or as Linux sets it up (typical: CUBIC on every "
                   "route, tcp_rmem/tcp_wmem max 6/4 MiB); the data servers set their WAN legs' congestion "
                   "control either way (s2cs --wan-congestion, BBR).")
@click.option("--udp", is_flag=True,
              help="Datagrams instead of TCP streams: the consumer opens a UDP flow on each listener, the "
                   "producer answers with numbered datagrams (--size in all), each one checked; loss and "
                   "reordering reported. Builtin seals them on the WAN leg; Nginx carries them in the clear "
                   "(its control servers get --udp-plaintext).")
@click.option("--datagram-size", type=click.IntRange(21, 65000), default=1200, show_default=True,
              help="With --udp: bytes per datagram.")
@click.option("--in-testbed", default=None, hidden=True)  # set by --netns for the run inside the user's host
@click.option("--verbose", "-v", is_flag=True, help="Debug logging, the control servers' and gRPC's included.")
def demo(size, num_conn, server_type, rate, keep_dir, netns, udp, datagram_size, in_testbed, verbose, wan_hosts,
         **wan_opts) -> None:
    """Run a whole session on this machine: two control servers, a producer, a consumer,
    every byte verified, everything released."""
    setup_logging(verbose)
    if size < num_conn:
        raise click.BadParameter("--size must be at least one byte per connection", param_hint="'--size'")
    testbed = None
    wan, wan_args = _wan_spec(wan_opts, netns or in_testbed is not None)
    if wan_hosts is not None and wan is None:
        raise click.UsageError("--wan-hosts sets the gateways up for an emulated WAN: give --wan-rtt too")
    wan_hosts = wan_hosts or "advised"
    if netns and in_testbed is None:
        from ..netns import unavailable_reason
        reason = unavailable_reason()
        if reason is None:
            sys.exit(_demo_in_testbed(["--size", str(size), "--num-conn", str(num_conn), "--type", server_type,
                                       "--rate", str(rate), "--datagram-size", str(datagram_size)]
                                      + ["--keep-dir"] * keep_dir + ["-v"] * verbose + ["--udp"] * udp
                                      + wan_args + ["--wan-hosts", wan_hosts] * (wan is not None), wan, wan_hosts))
        if wan is not None:  # no emulated WAN on loopback
            die(f"[red]demo failed[/]: --netns: {reason}; the emulated WAN (--wan-*) needs it", Exit.FAILED)
        err.print(f"[yellow]--netns: {reason}; running on loopback instead[/]")
    if in_testbed is not None:
        from ..netns import Testbed, TestbedError
        try:
            testbed = Testbed.attach(in_testbed, wan=wan)
        except TestbedError as exc:
            die(f"[red]demo failed[/]: {exc}", Exit.FAILED)
    opts = DemoOptions(size=size - size % num_conn, num_conn=num_conn, server_type=server_type,
                       rate=rate, keep_dir=keep_dir, say=out.print, testbed=testbed, udp=udp,
                       datagram_size=datagram_size)
    try:
        report = asyncio.run(run_demo(opts))
    except KeyboardInterrupt:
        die("[yellow]demo interrupted; everything it started was stopped[/]", 130)
    except (ScistreamError, RuntimeError, OSError) as exc:
        die(f"[red]demo failed[/]: {exc}", Exit.FAILED)
    setup = sum(secs for name, secs in report.steps if not name.startswith("transfer"))
    out.print(f"report: session {report.uid}; setup and release took {setup * 1000:.0f} ms over "
              f"{len(report.steps) - 1} steps (times above)")
    if report.udp is not None:
        u = report.udp
        out.print(f"[green]verified {u['datagrams']} datagrams[/] of {datagram_size} bytes ({u['bytes']} bytes) over "
                  f"{report.streams} UDP flows in {report.transfer_seconds:.2f} s: {u['lost']} lost "
                  f"({u['loss']:.3%}), {u['reordered']} out of order, {u['duplicates']} duplicated, through PROD "
                  f"and CONS data servers ({report.server_type}, WAN leg {report.wan_security}, UDP "
                  f"{'sealed' if report.server_type.lower() == 'builtin' and report.wan_security == 'tls' else 'in the clear'})")
        return
    out.print(f"[green]verified {report.bytes_verified} bytes[/] ({report.bytes_verified / (1 << 20):.0f} MiB) "
              f"over {report.streams} connections in {report.transfer_seconds:.2f} s: "
              f"{report.gbps:.2f} Gbit/s through PROD and CONS data servers ({report.server_type}, "
              f"WAN leg {report.wan_security})")
    if wan is not None:
        out.print(f"  over the emulated WAN: {wan.describe()}; gateways set up "
                  + ("as `s2cs check-config` advises" if wan_hosts == "advised" else
                     "as typical gateways (CUBIC routes, Linux's default buffer caps)")
                  + "; WAN legs' congestion control: the data servers' (s2cs --wan-congestion auto)")


def _wan_spec(opts: dict, netns: bool):
    """The emulated WAN the ``--wan-*`` options ask for (None if none), and those options again
    for the demo's run inside the testbed."""
    given = {k: v for k, v in opts.items() if v is not None}
    if not given:
        return None, []
    if not netns:
        raise click.UsageError("the --wan-* options need --netns (the WAN is emulated between the testbed's gateways)")
    if "wan_rtt" not in given:
        raise click.UsageError("an emulated WAN needs its round trip: --wan-rtt (e.g. 50ms)")
    from ..netns import WanSpec, WanSpecError
    try:
        spec = WanSpec(rtt_ms=given["wan_rtt"], rate=given.get("wan_rate", "1gbit"), loss=given.get("wan_loss", 0),
                       mtu=given.get("wan_mtu", 1500), jitter_ms=given.get("wan_jitter", 0))
    except WanSpecError as exc:
        raise click.BadParameter(str(exc)) from None
    return spec, [f"--{k.replace('_', '-')}={v}" for k, v in given.items()]


def _demo_in_testbed(args: list[str], wan=None, wan_hosts: str = "advised") -> int:
    """Build the namespaces, run the demo from the user's host inside them, remove them all."""
    from ..netns import Testbed, TestbedError
    tb = Testbed(wan=wan)
    try:
        tb.create()
    except TestbedError as exc:
        err.print(f"[red]demo failed[/]: cannot build the testbed: {exc}")
        return Exit.FAILED
    try:
        out.print(tb.describe())
        out.print("  no route between the facilities, ip_forward=0 everywhere: "
                  "only a SciStream session connects them" if wan is None else
                  "  no route between the facilities' LANs; only the router forwards, and only between the "
                  "gateways' WAN addresses: only a SciStream session connects the facilities")
        if wan is not None:
            out.print(f"  gateways' TCP set up {wan_hosts}:")
            try:
                for line in tb.set_up_gateways(wan_hosts):
                    out.print(line)
            except TestbedError as exc:
                err.print(f"[red]demo failed[/]: cannot set the gateways up: {exc}")
                return Exit.FAILED
        inner = subprocess.Popen(tb.argv(tb.user, sys.executable, "-m", "scistream.cli.scistream", "demo",
                                         *args, "--in-testbed", tb.tag), stdin=subprocess.DEVNULL)
        try:
            return inner.wait()
        except KeyboardInterrupt:  # the inner demo got the Ctrl-C too and stops what it started
            try:
                inner.wait(30)
            except subprocess.TimeoutExpired:
                inner.kill()
                inner.wait()
            return 130
    finally:
        tb.destroy()
        out.print(f"testbed {tb.tag} removed: namespaces, links and processes")


def main() -> None:
    cli(prog_name="scistream")


if __name__ == "__main__":
    main()

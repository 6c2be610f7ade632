"""``s2cs``: the SciStream control server of one gateway node.

    s2cs --port=5000 --listener-ip=127.0.0.1 --type=Builtin --auth none
    s2cs start --port=5000 --listener-ip=127.0.0.1 --verbose     # the original's form
"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click
from rich.markup import escape

from .. import __version__
from ..auth.base import AuthConfigError, make_authenticator
from ..config import check_config_command, config_option
from ..control.server import ConfigError, ServerConfig, serve
from ..data.base import backend_names
from ..data.spec import UDP_IDLE, UDP_MAX_FLOWS, parse_keepalive
from .common import Exit, die, err, option, setup_logging, stacked

TYPES = backend_names()


class _Parsed(click.ParamType):
    """A value ``parse`` reads (its ValueError is the message); one of type ``done`` is read already."""

    def __init__(self, name: str, parse, done: type) -> None:
        self.name, self.parse, self.done = name, parse, done

    def convert(self, value, param, ctx):
        if isinstance(value, self.done):
            return value
        try:
            return self.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _rtt(value) -> float:
    """A round trip: ``100ms``, ``0.15s``, ``50`` (ms) -> seconds."""
    from ..netns.wan import parse_ms
    if (ms := parse_ms(value, "round trip")) <= 0:
        raise ValueError(f"round trip {value!r} must be above 0")
    return ms / 1000


def _rate(value) -> float:
    """A rate: ``10gbit``, ``400mbit``, ``1e9`` -> bit/s."""
    from ..netns.wan import parse_rate
    if (bps := parse_rate(value)) is None:
        raise ValueError(f"rate {value!r} must be above 0")
    return float(bps)


KEEPALIVE = _Parsed("IDLE,INTERVAL,COUNT", parse_keepalive, tuple)   # or "system"
RTT = _Parsed("DURATION", _rtt, float)
RATE = _Parsed("RATE", _rate, float)


server_options = stacked(
    config_option(),
    option("--port", type=click.IntRange(0, 65535), default=5000, show_default=True,
           help="gRPC control port (0: any free port)."),
    option("--listener-ip", default="127.0.0.1", show_default=True,
           help="Address the data servers listen on and report in listeners."),
    option("--control-ip", default=None, help="Address the control port binds (default: --listener-ip)."),
    option("--type", "server_type", default="Builtin", show_default=True,
           type=click.Choice(TYPES, case_sensitive=False), help="Data server kind."),
    option("--port-range", default="5100-5200", show_default=True, help="Ports for data-server listeners."),
    option("--hello-timeout", type=float, default=180.0, show_default=True,
           help="Seconds a req waits for the application's hello."),
    option("--hello-grace", type=float, default=5.0, show_default=True,
           help="Seconds a hello that came before its req waits for it."),
    option("--max-conn", type=int, default=64, show_default=True, help="Largest num_conn a session may ask for."),
    option("--max-rate", type=int, default=0, show_default=True,
           help="Bandwidth of this node in kbit/s shared by all sessions (0: unlimited)."),
    option("--server-cert", "--server-crt", type=click.Path(dir_okay=False, path_type=Path), default=None,
           help="TLS certificate (PEM) for the control channel."),
    option("--server-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
           help="TLS private key (PEM) for the control channel."),
    option("--insecure", is_flag=True, help="Plaintext control channel (development only)."),
    option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
           help="Certificate, configs, logs, sessions (default: ~/.local/state/scistream/s2cs-PORT)."),
    option("--store", default=None, metavar="URL",
           help="Session store: postgresql://USER@HOST[:PORT]/DB[?sslmode=verify-full...], shared by "
                "several nodes (default: SQLite sessions.db in the state directory)."),
    option("--facility", is_flag=True,
           help="A facility of several nodes: sessions are placed on the node services registered in "
                "--store (s2ds serve --store ...); every s2cs of the facility is active."),
    option("--node-token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
           help="--facility: the facility's node token (mode 0600), the one the nodes obey."),
    option("--node-timeout", type=click.FloatRange(0, min_open=True), default=15.0, show_default=True,
           help="--facility: seconds without a heartbeat before a node is lost and its sessions fail."),
    option("--auth", type=click.Choice(["none", "static", "jwt", "globus"]), default=None,
           help="How callers are authenticated (required; `none` is for development only)."),
    option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
           help="--auth static: the token-hash file (`s2cs token add` writes it)."),
    option("--jwt-jwks", default=None, metavar="PATH_OR_URL", help="--auth jwt: the JWKS file or URL."),
    option("--jwt-issuer", default=None, help="--auth jwt: the issuer (iss) to accept."),
    option("--jwt-audience", default=None, help="--auth jwt: the audience (aud) tokens must name."),
    option("--jwt-leeway", type=float, default=None, help="--auth jwt: clock leeway in seconds [30]."),
    option("--globus-config", type=click.Path(dir_okay=False, path_type=Path), default=None,
           help="--auth globus: TOML file with client_id, client_secret, scope[, audience] "
                "(or SCISTREAM_GLOBUS_CLIENT_ID / _SECRET / _SCOPE in the environment)."),
    option("--client-id", default=None, help="--auth globus: this S2CS's Globus client id."),
    option("--client-secret", default=None, hidden=True),
    option("--globus-scope", default=None, help="--auth globus: the scope tokens must carry."),
    option("--globus-audience", default=None,
           help="--auth globus: the audience tokens must name (default: the client id)."),
    option("--auth-cache-ttl", type=float, default=None,
           help="Seconds a token check is remembered (globus [60]; jwt: JWKS URL refresh [300])."),
    option("--auth-timeout", type=float, default=None,
           help="Seconds to wait for Globus Auth or a JWKS URL [10]."),
    option("--admin", "admins", multiple=True, help="Identity that may release any session (repeatable)."),
    option("--wan-plaintext", is_flag=True, help="Do not encrypt the WAN leg (operator's choice)."),
    option("--allow-legacy-plaintext", is_flag=True,
           help="Give clients of the original tooling (no WAN secret) a plaintext WAN leg."),
    option("--enforce-legacy-rate", is_flag=True,
           help="Enforce the rate of clients of the original tooling (no WAN secret) too; by "
                "default it is not (they send 10000 kbit/s, which that tooling never enforced)."),
    option("--max-lease", type=click.FloatRange(0), default=0.0, show_default=True,
           help="Longest session lifetime in seconds, also the default; a req may ask for less "
                "(0: unlimited)."),
    option("--update-timeout", type=click.FloatRange(0), default=3600.0, show_default=True,
           help="Seconds a session may wait between its hello and its update before it "
                "expires and frees its ports (0: no limit)."),
    option("--tcp-keepalive", type=KEEPALIVE, default="60,15,4", show_default=True,
           help="TCP keepalive of the data servers' sockets, IDLE,INTERVAL,COUNT (seconds, "
                "seconds, probes): a peer that vanished silently is dropped after "
                "IDLE + INTERVAL x COUNT seconds; 'system' keeps the kernel's settings."),
    option("--wan-congestion", default="auto", show_default=True, metavar="NAME",
           help="Builtin: congestion control of the WAN leg's sockets (TCP_CONGESTION): a name this "
                "kernel has (net.ipv4.tcp_available_congestion_control), 'auto' (bbr where the kernel "
                "has it, else the kernel's default) or 'system' (the kernel's default, or a route's "
                "congctl). The LAN legs keep the kernel's default."),
    option("--max-rtt", type=RTT, default="100ms", show_default=True,
           help="The longest round trip of a WAN path this gateway serves: the line at start says "
                "what one stream can reach there with this host's buffer limits."),
    option("--drain", is_flag=True,
           help="On SIGTERM/Ctrl-C release every session; by default connected sessions keep "
                "running and the next start re-adopts them."),
    option("--metrics-port", type=click.IntRange(0, 65535), default=None,
           help="Serve Prometheus metrics on this port (0: any free port; default: off)."),
    option("--metrics-ip", default=None, help="Address of the metrics endpoint (default: the control ip)."),
    option("--workers", type=click.IntRange(0), default=0, show_default=True,
           help="Builtin: worker processes of the node service this s2cs runs (0: one per core)."),
    option("--data-service", type=click.Path(dir_okay=False, path_type=Path), default=None,
           metavar="SOCKET",
           help="Builtin: use the node service an operator runs on this socket (s2ds serve) "
                "instead of starting one (STATE_DIR/node.sock)."),
    option("--plain-relay", type=click.Choice(["auto", "splice", "copy"]), default="auto", show_default=True,
           help="Builtin: how the node service this s2cs runs moves plain legs: copy (recv/send) "
                "or splice; auto copies on loopback legs, where it costs less, and splices "
                "elsewhere."),
    option("--max-session-conns", type=click.IntRange(0), default=0, show_default=True,
           help="Open connections one session may have; data servers refuse more and count "
                "the refusals (0: no cap; Stunnel cannot enforce it)."),
    click.option("--udp/--no-udp", "udp", default=True, show_default=True,
           help="Carry UDP on every session port beside TCP, to the same targets (the first "
                "datagram from a new source opens a flow). Builtin and Nginx only: HAProxy and "
                "stunnel carry no UDP. Builtin encrypts it on the WAN leg; Nginx cannot, so it "
                "carries UDP only on sessions whose WAN leg is plain, unless --udp-plaintext."),
    option("--udp-plaintext", is_flag=True,
           help="Nginx: carry UDP IN THE CLEAR across the WAN even beside an encrypted TCP leg "
                "(logged at start, shown in status and the web view)."),
    option("--udp-max-flows", type=click.IntRange(0), default=UDP_MAX_FLOWS, show_default=True,
           help="UDP flows (sources) one session may have open at once; datagrams of more are "
                "dropped and counted (0: no cap)."),
    option("--udp-idle", type=click.FloatRange(0, min_open=True), default=UDP_IDLE, show_default=True,
           help="Seconds a UDP flow lasts without a datagram either way."),
    option("--web-port", type=click.IntRange(0, 65535), default=None,
           help="Serve the read-only web view of sessions and throughput on this port, with "
                "the same authentication and TLS as the control channel (0: any free port; "
                "default: off)."),
    option("--web-ip", default=None, help="Address of the web view (default: the control ip)."),
    option("--ready-file", type=click.Path(dir_okay=False, path_type=Path), default=None, hidden=True),
    option("--verbose", "-v", is_flag=True, help="Debug logging."))


AUTH_OPTIONS = ("token_file", "jwt_jwks", "jwt_issuer", "jwt_audience", "jwt_leeway", "globus_config",
                "client_id", "globus_scope", "globus_audience", "auth_cache_ttl", "auth_timeout")


def _run(**kw) -> None:
    setup_logging(kw.pop("verbose"), quiet_default=False)
    if kw.pop("client_secret"):
        die("[red]s2cs: a client secret on the command line is visible to every user (ps); "
            "set SCISTREAM_GLOBUS_CLIENT_SECRET or use --globus-config FILE instead[/]", Exit.USAGE)
    auth_options = {k: v for k in AUTH_OPTIONS if (v := kw.pop(k)) is not None}
    config = ServerConfig(**kw, auth_options=auth_options)
    try:
        authenticator = None
        if config.auth is not None and (config.auth != "none" or auth_options):
            authenticator = make_authenticator(config.auth or "none", **auth_options)
        asyncio.run(serve(config, authenticator=authenticator))
    except (AuthConfigError, ConfigError) as exc:
        die(f"[red]s2cs: {escape(str(exc))}[/]", Exit.USAGE)
    except KeyboardInterrupt:
        pass


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="\b\nExamples:\n  s2cs --config /etc/scistream/s2cs.toml\n"
                    "  s2cs --port 5000 --listener-ip 10.0.0.2 --type Builtin --auth none\n"
                    "  s2cs check-config /etc/scistream/s2cs.toml\n"
                    "  s2cs check-config --max-rtt 100ms --rate 10gbit\n\n"
                    "Exit codes: 0 stopped (SIGTERM, Ctrl-C); 2 bad flags or configuration (the "
                    "message says which); 1 another failure.")
@click.version_option(__version__, prog_name="s2cs")
@server_options
@click.pass_context
def cli(ctx: click.Context, **kw) -> None:
    """SciStream control server (S2CS) for one gateway node."""
    if ctx.invoked_subcommand is None:
        _run(**kw)


@cli.command("start", epilog="Example: s2cs start --config /etc/scistream/s2cs.toml --verbose")
@server_options
def start(**kw) -> None:
    """Start the control server (same as running s2cs with no command)."""
    _run(**kw)


@cli.group("token")
def token() -> None:
    """Manage the token file of `--auth static`."""


_token_file = option("--token-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
                     help="The token file the server reads (created mode 0600 if missing).")


def _tokens(action: str, fn, *args):
    """``fn(*args)`` on the token file; a bad one: its line, and exit 2."""
    try:
        return fn(*args)
    except AuthConfigError as exc:
        die(f"[red]s2cs token {action}: {escape(str(exc))}[/]", Exit.USAGE)


@token.command("add", epilog="Example: s2cs token add alice@uni.edu --token-file /etc/scistream/tokens")
@click.argument("identity")
@_token_file
def token_add(identity: str, token_file: Path) -> None:
    """Make a token for IDENTITY; print it once (only its hash is kept)."""
    from ..auth.static import add_token
    new = _tokens("add", add_token, token_file, identity)
    err.print(f"token for {escape(identity)} added to {token_file}; copy it now, it is not stored:")
    click.echo(new)


@token.command("list", epilog="Example: s2cs token list --token-file /etc/scistream/tokens")
@_token_file
def token_list(token_file: Path) -> None:
    """List the identities that have tokens."""
    from ..auth.static import list_identities
    for ident, digest in _tokens("list", list_identities, token_file):
        click.echo(f"{ident}\t{digest}")


@token.command("remove", epilog="Example: s2cs token remove alice@uni.edu --token-file /etc/scistream/tokens")
@click.argument("identity")
@_token_file
def token_remove(identity: str, token_file: Path) -> None:
    """Remove every token of IDENTITY (takes effect without a restart)."""
    from ..auth.static import remove_identity
    n = _tokens("remove", remove_identity, token_file, identity)
    err.print(f"{n} token(s) of {escape(identity)} removed")
    if not n:
        sys.exit(Exit.REFUSED)


@cli.group("nodes")
def nodes() -> None:
    """The nodes of a facility (s2cs --facility): list, drain, undrain."""


_store_option = option("--store", required=True, metavar="URL", envvar="SCISTREAM_STORE",
                       help="The facility's store: postgresql://USER@HOST[:PORT]/DB.")


def _nodes_call(url: str, what):
    """Run ``what(store)`` on the facility's store; a clear line and exit code on failure."""
    from ..control.pgstore import PostgresStore
    from ..control.store import StoreError
    from ..errors import ScistreamError

    async def run():
        store = PostgresStore(url, node="s2cs-nodes")   # StoreError for a URL that is not postgresql://
        await store.open()
        try:
            return await what(store)
        finally:
            await store.close()
    try:
        return asyncio.run(run())
    except ScistreamError as exc:
        die(f"[red]s2cs nodes: {escape(str(exc))}[/]",
            Exit.RETRY if isinstance(exc, StoreError) else Exit.REFUSED)


@nodes.command("list", epilog="Example: s2cs nodes list --store postgresql://scistream@db/scistream")
@_store_option
@option("--node-timeout", type=click.FloatRange(0, min_open=True), default=15.0, show_default=True,
        help="Show a node as late when its heartbeat is older than this.")
@option("--json", "as_json", is_flag=True, help="One JSON document (nodes and control instances).")
def nodes_list(store: str, node_timeout: float, as_json: bool) -> None:
    """Every node (state, load, heartbeat) and every control instance of the facility."""
    import json as jsonlib
    from ..control.facility import list_nodes
    got = _nodes_call(store, lambda st: list_nodes(st, node_timeout))
    if as_json:
        click.echo(jsonlib.dumps(got, indent=1))
        return
    click.echo(f"{'NODE':<16} {'STATE':<8} {'ADDRESS':<16} {'SESSIONS':>8} {'PORTS USED':>10} "
               f"{'RATE USED':>14} {'HEARTBEAT':>9}  REASON")
    for n in got["nodes"]:
        rate = (f"{n['bandwidth_used_kbps']}/{n['max_rate_kbps']}" if n["max_rate_kbps"] else "-")
        click.echo(f"{n['name']:<16} {n['state']:<8} {n['address']:<16} {n['sessions']:>8} "
                   f"{n['ports_used']:>10} {rate:>14} {n['heartbeat_age_s']:>8.1f}s  {n['reason']}")
    if not got["nodes"]:
        click.echo("(no node has registered; start s2ds serve --store ... on each data-transfer node)")
    for i in got["instances"]:
        click.echo(f"control instance {i['name']} at {i['address']} (pid {i['pid']}), "
                   f"heartbeat {i['heartbeat_age_s']:.1f}s ago")


def _drain(name: str, store: str, drained: bool) -> None:
    from ..control.facility import set_drained
    _nodes_call(store, lambda st: set_drained(st, name, drained))
    click.echo(f"node {name} {'drained: it takes no new session; running ones go on until released' if drained else 'takes new sessions again'}")


@nodes.command("drain", epilog="Example: s2cs nodes drain dtn1 --store postgresql://scistream@db/scistream")
@click.argument("name")
@_store_option
def nodes_drain(name: str, store: str) -> None:
    """Place no new session on node NAME (running ones go on)."""
    _drain(name, store, True)


@nodes.command("undrain", epilog="Example: s2cs nodes undrain dtn1 --store postgresql://scistream@db/scistream")
@click.argument("name")
@_store_option
def nodes_undrain(name: str, store: str) -> None:
    """Let node NAME take new sessions again."""
    _drain(name, store, False)


cli.add_command(check_config_command(lambda: start))


def main() -> None:
    cli(prog_name="s2cs")


if __name__ == "__main__":
    main()

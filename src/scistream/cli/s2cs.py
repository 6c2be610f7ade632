"""``s2cs``: the SciStream control server of one gateway node.

    s2cs --port=5000 --listener-ip=127.0.0.1 --type=Builtin --auth none
    s2cs start --port=5000 --listener-ip=127.0.0.1 --verbose     # the original's form
"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from .. import __version__
from ..control.server import ConfigError, ServerConfig, serve
from .common import Exit, err, option, setup_logging

TYPES = ["Builtin", "Haproxy", "HaproxySubprocess", "Nginx", "Stunnel", "StunnelSubprocess"]


def server_options(fn):
    opts = [
        option("--port", type=int, default=5000, show_default=True, help="gRPC control port (0: any free port)."),
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
        option("--auth", type=click.Choice(["none", "static", "jwt", "globus"]), default=None,
               help="How callers are authenticated (required; `none` is for development only)."),
        option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
               help="--auth static: the token file."),
        option("--admin", "admins", multiple=True, help="Identity that may release any session (repeatable)."),
        option("--wan-plaintext", is_flag=True, help="Do not encrypt the WAN leg (operator's choice)."),
        option("--allow-legacy-plaintext", is_flag=True,
               help="Give clients of the original tooling (no WAN secret) a plaintext WAN leg."),
        option("--ready-file", type=click.Path(dir_okay=False, path_type=Path), default=None, hidden=True),
        option("--verbose", "-v", is_flag=True, help="Debug logging."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _run(**kw) -> None:
    setup_logging(kw.pop("verbose"), quiet_default=False)
    token_file = kw.pop("token_file")
    auth_options = {"token_file": token_file} if token_file else {}
    config = ServerConfig(**kw, auth_options=auth_options)
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:
        err.print(f"[red]s2cs: {exc}[/]")
        sys.exit(Exit.USAGE)
    except KeyboardInterrupt:
        pass


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Example: s2cs --port 5000 --listener-ip 10.0.0.2 --type Builtin --auth none")
@click.version_option(__version__, prog_name="s2cs")
@server_options
@click.pass_context
def cli(ctx: click.Context, **kw) -> None:
    """SciStream control server (S2CS) for one gateway node."""
    if ctx.invoked_subcommand is None:
        _run(**kw)


@cli.command("start")
@server_options
def start(**kw) -> None:
    """Start the control server (same as running s2cs with no command)."""
    _run(**kw)


def main() -> None:
    cli(prog_name="s2cs")


if __name__ == "__main__":
    main()

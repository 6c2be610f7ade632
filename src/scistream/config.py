"""The control server's configuration file (``s2cs --config FILE``, ``s2cs check-config FILE``).

A TOML file whose keys are the flag names of ``s2cs`` without the dashes in front
(``listener-ip``; the original's ``listener_ip`` spelling works too), so everything a flag
sets, the file can set, and a flag given on the command line wins over the file. The
schema is read from the click command itself (``schema_for``): a flag added to ``s2cs``
is a key of the file at once, with the same type and the same choices.

    port = 5000
    listener-ip = "10.0.0.2"
    type = "Haproxy"
    port-range = "5100-5200"
    auth = "static"
    token-file = "tokens"          # relative paths are relative to this file's directory
    admin = ["ops@facility.org"]   # repeatable flags take a list

    schema = schema_for(s2cs_start_command)
    values = load(Path("/etc/scistream/s2cs.toml"), schema)     # ConfigFileError lists problems
    problems = check(Path("s2cs.toml"), schema)                  # [] when the file is good

Problems say where: ``s2cs.toml:7: listner-ip: unknown key (did you mean listener-ip?)``.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Iterable, Mapping

import click

log = logging.getLogger(__name__)


def config_dir() -> Path:
    """The user's client settings, tokens and session records: ``~/.config/scistream``
    (``$XDG_CONFIG_HOME/scistream``, or ``$SCISTREAM_CONFIG_DIR``)."""
    if explicit := os.environ.get("SCISTREAM_CONFIG_DIR"):
        return Path(explicit)
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "scistream"


# Flags that are not settings: the file itself, the test-only ready file, help and version.
NOT_SETTINGS = {"config", "ready_file", "help", "version"}
# Files that must exist when the server starts (a path that is only written is not here).
MUST_EXIST = {"server_cert", "server_key", "token_file", "globus_config", "node_token_file"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One key the file may set: the flag it stands for, and what it takes."""
    key: str                   # canonical key: the first long flag name, "listener-ip"
    param: str                 # the click parameter name, "listener_ip"
    kind: str                  # bool, int, float, str, path
    option: click.Option = dataclasses.field(repr=False, compare=False)   # its own type checks values
    multiple: bool = False     # a repeatable flag: the file gives a list
    choices: tuple[str, ...] = ()

    def expects(self) -> str:
        one = {"bool": "true or false", "int": "an integer", "float": "a number",
               "str": "a string", "path": "a path (string)"}[self.kind]
        if self.choices:
            one = "one of " + ", ".join(self.choices)
        return f"a list of {self.kind} values" if self.multiple else one


@dataclasses.dataclass(frozen=True)
class Problem:
    """What is wrong, and where: ``file:line: key: message``."""
    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigFileError(Exception):
    """The file cannot be used; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(map(str, problems)))


def _kind(option: click.Option) -> str:
    if option.is_flag and not option.count:
        return "bool"
    t = option.type
    if isinstance(t, click.Path):
        return "path"
    if isinstance(t, (click.types.IntParamType, click.IntRange)):
        return "int"
    if isinstance(t, (click.types.FloatParamType, click.FloatRange)):
        return "float"
    return "str"


def schema_for(command: click.Command) -> dict[str, Setting]:
    """Every key the file may set for ``command``, by each of its spellings."""
    keys: dict[str, Setting] = {}
    for p in command.params:
        if not isinstance(p, click.Option) or p.hidden or p.name in NOT_SETTINGS:
            continue
        if not (longs := [o[2:] for o in p.opts if o.startswith("--")]):
            continue
        choices = tuple(map(str, p.type.choices)) if isinstance(p.type, click.Choice) else ()
        s = Setting(key=longs[0], param=p.name or longs[0].replace("-", "_"), kind=_kind(p), option=p,
                    multiple=bool(p.multiple), choices=choices)
        for name in longs:
            keys[name.replace("_", "-")] = s
    return keys


# -- where keys are -----------------------------------------------------------------------
_TABLE = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*((?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+)(?:\s*\.\s*(?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+))*)\s*=""")


def _parts(dotted: str) -> list[str]:
    return [p.strip().strip("\"'") for p in re.findall(r"""("[^"]*"|'[^']*'|[^.]+)""", dotted)]


def key_lines(text: str) -> dict[str, int]:
    """The line of each key path (``a.b``) and table header in a TOML text (1-based)."""
    lines: dict[str, int] = {}
    table: list[str] = []
    in_multiline = None
    for n, raw in enumerate(text.splitlines(), 1):
        if in_multiline:
            if in_multiline in raw:
                in_multiline = None
            continue
        if m := _TABLE.match(raw):
            table = _parts(m.group(1))
            lines.setdefault(".".join(table), n)
            continue
        if m := _KEY.match(raw):
            path = ".".join(table + _parts(m.group(1)))
            lines.setdefault(path, n)
            rest = raw[m.end():]
            for q in ('"""', "'''"):
                if rest.count(q) == 1:
                    in_multiline = q
    return lines


# -- checking values ---------------------------------------------------------------------------
_TYPES = {"bool": bool, "int": int, "float": (int, float), "str": str, "path": str}


def _type_ok(s: Setting, value: Any) -> bool:
    """``value`` is of the setting's kind (TOML's true is not a number here)."""
    return isinstance(value, _TYPES[s.kind]) and (s.kind == "bool" or not isinstance(value, bool))


def _click_check(s: Setting, value: Any) -> str | None:
    """Run the flag's own type (ranges, choices); its message if it refuses the value."""
    try:
        with click.Context(click.Command("s2cs")) as ctx:
            s.option.type_cast_value(ctx, value)
    except click.BadParameter as exc:
        return exc.message
    return None


def _semantic(values: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    """Checks across values, as (param, message)."""
    from .control.ports import parse_port_range
    from .errors import InvalidArgument
    if "port_range" in values:
        try:
            parse_port_range(values["port_range"])
        except InvalidArgument as exc:
            yield "port_range", str(exc)
    for name in ("hello_timeout", "max_conn"):
        if name in values and values[name] <= 0:
            yield name, f"must be > 0, got {values[name]}"
    for name in ("hello_grace", "max_rate", "max_lease", "update_timeout"):
        if name in values and values[name] < 0:
            yield name, f"must be >= 0, got {values[name]}"
    if "tcp_keepalive" in values and not isinstance(values["tcp_keepalive"], tuple):
        from .data.spec import parse_keepalive
        try:
            parse_keepalive(values["tcp_keepalive"])
        except ValueError as exc:
            yield "tcp_keepalive", str(exc)
    if isinstance(values.get("wan_congestion"), str):
        from .data.hosttcp import CongestionError, resolve_congestion
        try:
            resolve_congestion(values["wan_congestion"])
        except CongestionError as exc:
            yield "wan_congestion", str(exc)
    if ("server_cert" in values) != ("server_key" in values):
        have, missing = ("server_cert", "server-key") if "server_cert" in values else ("server_key", "server-cert")
        yield have, f"set {missing} too: the certificate and its key go together"
    needed = {"token_file": "static", "globus_config": "globus"}  # only read by that --auth
    for name in sorted(MUST_EXIST & set(values)):
        if name in needed and values.get("auth", needed[name]) != needed[name]:
            continue
        p = Path(values[name])
        if not p.is_file():
            yield name, f"file {p} does not exist" if not p.exists() else f"{p} is not a file"
    jwks = values.get("jwt_jwks")
    if isinstance(jwks, str) and not jwks.startswith(("http://", "https://")):
        if not Path(jwks).is_file():
            yield "jwt_jwks", f"file {jwks} does not exist (give a path or an https:// URL)"
    if values.get("facility"):
        if not str(values.get("store") or "").startswith(("postgresql://", "postgres://")):
            yield "facility", "a facility needs store = \"postgresql://...\": its shared database"
        if "node_token_file" not in values:
            yield "facility", "a facility needs node-token-file: the token its nodes obey"
    if "server_type" in values:
        from .data.base import BackendUnavailable, get_backend
        try:
            get_backend(values["server_type"]).check_available()
        except (ValueError, BackendUnavailable) as exc:
            yield "server_type", str(exc)


def _read(path: Path, schema: Mapping[str, Setting], problems: list[Problem]) -> dict[str, Any]:
    name = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        problems.append(Problem(name, None, "", f"cannot read it: {exc.strerror}"))
        return {}
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        problems.append(Problem(name, int(m.group(1)) if m else None, "", f"not valid TOML: {msg}"))
        return {}
    lines = key_lines(text)
    base = path.resolve().parent
    values: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for key, value in data.items():
        line = lines.get(key)
        s = schema.get(key.replace("_", "-"))
        if s is None:
            if isinstance(value, dict):
                for sub in value:
                    problems.append(Problem(name, lines.get(f"{key}.{sub}", lines.get(key)), f"{key}.{sub}",
                                            "unknown key: the file has no tables; every key is an s2cs "
                                            "flag name at the top level"))
                continue
            keys = sorted({s.key for s in schema.values()})
            close = difflib.get_close_matches(key.replace("_", "-"), keys, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else "; `s2cs --help` lists the flags"
            problems.append(Problem(name, line, key, f"unknown key{hint}"))
            continue
        if s.param in seen:
            problems.append(Problem(name, line, key, f"set twice (also as {seen[s.param]})"))
            continue
        seen[s.param] = key
        items = value if s.multiple and isinstance(value, list) else [value]
        if s.multiple != isinstance(value, list) or not all(_type_ok(s, v) for v in items):
            got = type(value).__name__.replace("dict", "table").replace("list", "array")
            problems.append(Problem(name, line, key, f"expected {s.expects()}, got {got} {value!r}"))
            continue
        if refused := _click_check(s, value):
            problems.append(Problem(name, line, key, refused))
            continue
        if s.kind == "path":   # as the flag would take it, relative to the file's directory
            items = [p if (p := Path(v).expanduser()).is_absolute() else base / p for v in items]
        values[s.param] = tuple(items) if s.multiple else items[0]
    by_param = {s.param: s for s in schema.values()}
    for param, message in _semantic(values):
        key = seen.get(param, by_param[param].key if param in by_param else param)
        problems.append(Problem(name, lines.get(key), key, message))
    problems.sort(key=lambda p: (p.file != name, p.line or 1 << 30))  # in the file's order
    return values


def load(path: Path | str, schema: Mapping[str, Setting]) -> dict[str, Any]:
    """The file's settings by click parameter name, ready for ``ctx.default_map``.

    Raises ``ConfigFileError`` listing every problem."""
    problems: list[Problem] = []
    values = _read(Path(path), schema, problems)
    if problems:
        raise ConfigFileError(problems)
    return values


def check(path: Path | str, schema: Mapping[str, Setting], *, require: Iterable[str] = ("auth",)) -> list[Problem]:
    """Every problem of the file; also keys in ``require`` that it leaves unset."""
    problems: list[Problem] = []
    values = _read(Path(path), schema, problems)
    if problems and not values and all(p.line is None or not p.key for p in problems):
        return problems  # unreadable or not TOML: nothing more to say
    by_param = {s.param: s for s in schema.values()}
    for param in require:
        if param in by_param and param not in values and not any(p.key == by_param[param].key for p in problems):
            s = by_param[param]
            problems.append(Problem(str(path), None, s.key, f"not set; the server will not start without it "
                                                            f"({s.expects()})"))
    return problems


# -- the click side: `s2cs --config FILE` and `s2cs check-config FILE` ---------------------------
def _apply(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    """Eager callback of --config: the file's values become the defaults of the other flags,
    so a flag on the command line (or its environment variable) still wins."""
    if value is None:
        return
    try:
        values = load(value, schema_for(ctx.command))
    except ConfigFileError as exc:
        for p in exc.problems:
            click.echo(f"s2cs: {p}", err=True)
        click.echo(f"s2cs: {value}: {len(exc.problems)} problem(s); `s2cs check-config {value}` "
                   "checks a file without starting", err=True)
        ctx.exit(2)
    log.debug("settings from %s: %s", value, sorted(values))
    ctx.default_map = {**(ctx.default_map or {}), **values}
    if isinstance(ctx.command, click.Group) and "start" in ctx.command.commands:
        ctx.default_map["start"] = {**ctx.default_map.get("start", {}), **values}


def config_option() -> Any:
    """The --config FILE option, for a command whose other options are the settings."""
    return click.option("--config", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        is_eager=True, expose_value=False, callback=_apply, metavar="FILE",
                        envvar="SCISTREAM_S2CS_CONFIG",
                        help="TOML file of settings (keys: these flags' names); flags given here win.")


def check_config_command(settings_of: Any) -> click.Command:
    """``check-config [FILE] [--max-rtt D] [--rate R]`` for the command ``settings_of()`` returns:
    the file's settings, then this host's TCP limits against the rate wanted."""
    from .cli.s2cs import RATE, RTT
    @click.command("check-config", epilog="\b\nExamples:\n  s2cs check-config /etc/scistream/s2cs.toml\n"
                                          "  s2cs check-config s2cs.toml && systemctl restart s2cs\n"
                                          "  s2cs check-config --max-rtt 150ms --rate 10gbit\n\n"
                                          "Exit codes: 0 the file is good and one stream reaches --rate at "
                                          "--max-rtt; 1 it cannot (the sysctls to raise are printed); "
                                          "2 the file has problems (each printed as FILE:LINE: KEY: what is "
                                          "wrong) or --wan-congestion names a control this host lacks.")
    @click.argument("file", type=click.Path(dir_okay=False, path_type=Path), required=False)
    @click.option("--max-rtt", type=RTT, default=None,
                  help="Round trip of the longest WAN path [the file's max-rtt, else 100ms].")
    @click.option("--rate", type=RATE, default=None,
                  help="Rate one stream should reach, e.g. 10gbit; without it the host's figures only.")
    @click.option("--wan-congestion", default=None, metavar="NAME",
                  help="The congestion control to check [the file's wan-congestion, else auto].")
    @click.option("--json", "as_json", is_flag=True, help="One JSON document instead of lines.")
    def check_config(file: Path | None, max_rtt: float | None, rate: float | None, wan_congestion: str | None,
                     as_json: bool) -> None:
        """Check a configuration file without starting (unknown keys, wrong types, bad port
        ranges, missing certificate or token files, unknown data-server types), then this
        host's TCP: what one stream reaches at --max-rtt with its buffer limits, its
        congestion controls and MTUs, and which sysctl to raise, to what, for --rate."""
        values: dict[str, Any] = {}
        if file is not None:
            schema = schema_for(settings_of())
            problems = check(file, schema)
            if problems:
                for p in problems:
                    click.echo(str(p), err=True)
                click.echo(f"{file}: {len(problems)} problem(s)", err=True)
                raise SystemExit(2)
            values = load(file, schema)
            if not as_json:
                keys = ", ".join(dict.fromkeys(s.key for s in schema.values() if s.param in values))
                click.echo(f"{file}: OK ({len(values)} settings: {keys})")
        if max_rtt is None:
            max_rtt = RTT.convert(values.get("max_rtt", "100ms"), None, None)
        host_check(max_rtt, rate,
                   wan_congestion or values.get("wan_congestion") or "auto", as_json)
    return check_config


def host_check(rtt_s: float, rate_bps: float | None, wan_congestion: str, as_json: bool) -> None:
    """Print this host's TCP report; exit 1 if one stream cannot reach ``rate_bps``, 2 if
    ``wan_congestion`` cannot be had here."""
    import json
    from .data.hosttcp import CongestionError, HostTcp, resolve_congestion
    host = HostTcp.read()
    try:
        wan_cc = resolve_congestion(wan_congestion, host)
    except CongestionError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(2) from None
    lines, ok = host.report(rtt_s, rate_bps, wan_cc, wan_congestion)
    if as_json:
        win, bound = host.window_bytes()
        click.echo(json.dumps({
            "rtt_s": rtt_s, "rate_bps": rate_bps, "stream_limit_bps": host.stream_limit(rtt_s), "ok": ok,
            "in_flight_bytes": win, "bounded_by": bound, "wan_congestion": wan_cc,
            "tcp_rmem": host.tcp_rmem, "tcp_wmem": host.tcp_wmem, "rmem_max": host.rmem_max,
            "wmem_max": host.wmem_max, "available": host.available, "allowed": host.allowed,
            "default": host.default_cc, "mtus": host.mtus,
            "advice": dict(host.advice(rtt_s, rate_bps)) if rate_bps else {}}, indent=1))
    else:
        click.echo("\n".join(lines))
    if not ok:
        raise SystemExit(1)


__all__ = ["Setting", "Problem", "ConfigFileError", "schema_for", "load", "check", "key_lines",
           "config_option", "check_config_command", "host_check"]

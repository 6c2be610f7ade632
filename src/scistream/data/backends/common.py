"""What the external-proxy backends share: the binary, the listener check, the lifecycle.

``ProxyServer`` owns one proxy process (and its process group) per session: it writes
the configuration into ``spec.workdir`` (validated by the binary's own config test
first), starts the binary in the foreground, and returns from ``start()`` only once
every listener of ``spec.ports`` is bound on ``spec.listen_host`` *by that process
group* (read from /proc, so the check opens no connection that a proxy would forward
to the producer). ``stop()`` stops the group and anything left in it; ``wait_exit()``
completes with the exit status and the binary's last log lines; ``handle()``/``adopt()``
let a restarted control server take the process over by pid and config path.

A backend provides ``render()`` (config text for ``self.spec``), ``argv()``, and
optionally ``validate_argv()`` and ``reload()`` (default: restart).

    class Haproxy(ProxyServer):
        program, package, binaries, env_var = "haproxy", "haproxy", ("haproxy",), "SCISTREAM_HAPROXY"
        def render(self) -> str: ...
        def argv(self) -> list[str]: return [self.binary, "-W", "-f", str(self.conf_path)]
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Iterable

from ...addr import format_listener, parse_listener
from ...errors import DataServerError, InvalidArgument
from .. import wankeys
from ..base import BackendUnavailable, DataServer
from ..spec import DataSpec
from ..supervise import ChildProcess, cmdline, group_members, pid_alive, tail
from ..wankeys import write_private

log = logging.getLogger(__name__)

#: Searched after PATH: the Debian packages put haproxy and nginx in /usr/sbin, which is
#: not on an ordinary user's PATH.
SBIN_DIRS: tuple[str, ...] = ("/usr/local/sbin", "/usr/sbin", "/sbin")
READY_TIMEOUT = 15.0
RELOAD_TIMEOUT = 15.0
CHECK_TIMEOUT = 30.0
#: Idle timeout for a stream (seconds). Long on purpose: a quiet stream must survive for
#: days; TCP keepalive (enabled on every socket) finds dead peers instead.
IDLE_TIMEOUT_S = 7 * 24 * 3600
CONNECT_TIMEOUT_S = 15
#: A connection to a TLS WAN listener that has not completed the handshake within this many
#: seconds is closed (as the built-in type does, relay.HANDSHAKE_TIMEOUT): a flood of idle
#: or garbage connections is shed instead of holding sockets and memory for days.
HANDSHAKE_TIMEOUT_S = 10
#: Name both session certificates carry (wankeys); the TLS client checks it.
SESSION_NAME = "scistream-session"
_ERROR_LINE = re.compile(r"\[ALERT\]|\[emerg\]|\[crit\]|\[alert\]|LOG[0-3]\[|\[!\]|error|failed|"
                         r"in use|cannot|could not|unable|not found", re.I)
_NOISE = re.compile(r"No trusted certificates found|PSK identity not found")  # stunnel, harmless with PSK


def find_binary(names: Iterable[str], *, env_var: str, package: str) -> str:
    """The path of the first of ``names`` found ($env_var, then PATH, then SBIN_DIRS)."""
    names = tuple(names)
    override = os.environ.get(env_var)
    if override:
        if os.path.isfile(override) and os.access(override, os.X_OK):
            return override
        raise BackendUnavailable(f"{env_var}={override} is not an executable file; fix or unset it")
    search = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    for name in names:
        found = shutil.which(name, path=search)
        if found:
            return found
    raise BackendUnavailable(
        f"{' or '.join(names)} not found on PATH nor in {', '.join(SBIN_DIRS) or '(none)'}; "
        f"install the Debian package {package!r} (apt-get install {package}) "
        f"or set {env_var} to the binary")


def short_socket_path(workdir: Path, suffix: str) -> Path:
    """A Unix socket path short enough for AF_UNIX (107 bytes), private to this user."""
    base = Path(tempfile.gettempdir()) / f"scistream-{os.geteuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    st = base.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise DataServerError(f"{base} is not private to this user; remove it")
    name = hashlib.sha256(str(workdir.resolve()).encode()).hexdigest()[:20]
    return base / f"{name}-{suffix}.sock"


# -- /proc: listening sockets ------------------------------------------------------------
def socket_inodes(pids: Iterable[int]) -> set[int]:
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
    return inodes


def _decode_addr(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    ip_hex, port_hex = text.split(":")
    raw = bytes.fromhex(ip_hex)
    if sys.byteorder == "little":  # each 32-bit word is in host order
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw), int(port_hex, 16)


def _rows(table: str) -> list[list[str]]:
    """The rows of a /proc/net table, split into fields ([] if it cannot be read)."""
    try:
        with open(table) as f:
            return [line.split() for line in f.readlines()[1:]]
    except OSError:
        return []


def listening(pids: Iterable[int], addrs: set, *, udp: bool = False) -> dict[int, set[int]]:
    """TCP ports in LISTEN state on one of ``addrs`` held by one of ``pids``: port -> inodes
    (``udp``: UDP ports bound there, unconnected)."""
    inodes = socket_inodes(pids)
    found: dict[int, set[int]] = {}
    proto = "udp" if udp else "tcp"
    state = "07" if udp else "0A"      # UDP: TCP_CLOSE (unconnected); TCP: LISTEN
    for fields in _rows(f"/proc/net/{proto}") + _rows(f"/proc/net/{proto}6"):
        if len(fields) < 10 or fields[3] != state or int(fields[9]) not in inodes:
            continue
        ip, port = _decode_addr(fields[1])
        if ip in addrs:
            found.setdefault(port, set()).add(int(fields[9]))
    return found


def unix_listening(pids: Iterable[int]) -> dict[str, int]:
    """Unix stream sockets listening on a path, held by one of ``pids``: path -> inode."""
    inodes = socket_inodes(pids)
    # Num RefCount Protocol Flags Type St Inode Path; Flags 00010000: accepting
    return {fields[7]: int(fields[6]) for fields in _rows("/proc/net/unix")
            if len(fields) >= 8 and fields[3] == "00010000" and int(fields[6]) in inodes}


async def resolve_host(host: str) -> set:
    try:
        return {ipaddress.ip_address(host)}
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=1)  # SOCK_STREAM
    except OSError as exc:
        raise InvalidArgument(f"cannot resolve the listener address {host!r}: {exc}") from None
    return {ipaddress.ip_address(i[4][0].split("%")[0]) for i in infos}


async def run_check(argv: list[str], timeout: float = CHECK_TIMEOUT,
                    stderr: int = asyncio.subprocess.STDOUT) -> tuple[int, str]:
    """Run a short command (a config test); return its exit code and output (with its
    ``stderr``, unless that says otherwise)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=stderr)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.shield(proc.wait())
        raise
    return proc.returncode or 0, out.decode(errors="replace")


def error_lines(text: str, limit: int = 4) -> str:
    """The last error lines of a proxy's output (its own words for what went wrong)."""
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and _ERROR_LINE.search(ln) and not _NOISE.search(ln)]
    return " | ".join(lines[-limit:])


def log_since(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(1 << 20).decode(errors="replace")
    except OSError:
        return ""


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class ProxyServer(DataServer):
    """One session served by one external proxy process (and its workers)."""

    program: ClassVar[str] = ""            # "haproxy": names the files and the log
    package: ClassVar[str] = ""            # the Debian package to install
    binaries: ClassVar[tuple[str, ...]] = ()
    env_var: ClassVar[str] = ""            # overrides the binary's path
    shapes_rate: ClassVar[bool] = False    # honours spec.rate_kbps
    shows_certificate: ClassVar[bool] = True   # its WAN leg shows the session's leaf (not stunnel's PSK)
    _rate_warned: ClassVar[bool] = False
    _cap_warned: ClassVar[bool] = False

    def __init__(self, spec: DataSpec) -> None:
        super().__init__(spec)
        self.child: ChildProcess | None = None
        self.binary = ""
        self.creds: wankeys.CredentialFiles | None = None
        self._addrs: set = set()
        self._lock = asyncio.Lock()

    async def telemetry(self) -> dict[str, dict[str, Any]] | None:
        """The session's legs, read from outside with ``ss`` (``backends.sockets``)."""
        from .sockets import SocketWatch
        watch = getattr(self, "_watch", None)
        if watch is None or watch.targets != self.spec.targets:
            watch = self._watch = SocketWatch(role=self.spec.role, ports=self.spec.ports, targets=self.spec.targets)
        if not watch.available():
            return None
        try:
            return await watch.legs()
        except (OSError, ValueError, asyncio.TimeoutError) as exc:
            log.debug("session %s: cannot read its sockets: %s", self.spec.uid, exc)
            return None

    # -- hooks ------------------------------------------------------------------------
    def render(self) -> str:
        raise NotImplementedError

    def argv(self) -> list[str]:
        raise NotImplementedError

    def validate_argv(self, conf: Path) -> list[str] | None:
        """A command that tests ``conf`` (exit 0 = valid), or None if the binary has none."""
        return None

    def prepare(self) -> None:
        """Write whatever else the config refers to (called before ``render``)."""

    async def reload(self) -> None:
        """Make the running process use the (already written) new config (default: restart it)."""
        await self.stop()
        await self._spawn()

    # -- paths ------------------------------------------------------------------------
    @property
    def conf_path(self) -> Path:
        return self.spec.workdir / f"{self.program}.conf"

    @property
    def log_path(self) -> Path:
        return self.spec.workdir / f"{self.program}.log"

    # -- availability -----------------------------------------------------------------
    @classmethod
    def binary_path(cls) -> str:
        return find_binary(cls.binaries, env_var=cls.env_var, package=cls.package)

    @classmethod
    def check_available(cls) -> None:
        cls.binary_path()

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        async with self._lock:
            if self.child is not None and self.child.running:
                raise DataServerError(f"{self.program} for session {self.spec.uid} is already running")
            try:
                self.check_available()
                self.binary = self.binary_path()
            except BackendUnavailable as exc:
                raise DataServerError(str(exc)) from None
            self._check_spec(self.spec)
            self._addrs = await resolve_host(self.spec.listen_host)
            self.spec.workdir.mkdir(parents=True, exist_ok=True)
            self._credentials()
            self.prepare()
            await self._install_config(self.render())
            self._warn_unenforced()
            self._warn_udp()
            await self._spawn()

    async def _spawn(self) -> None:
        offset = log_size(self.log_path)
        self.child = await ChildProcess.spawn(self.argv(), log_path=self.log_path, name=self.program)
        try:
            await self.child.wait_ready(self._ready, timeout=READY_TIMEOUT)
        except DataServerError as exc:
            await self._reap_group(self.child.pid)
            detail = error_lines(log_since(self.log_path, offset)) or str(exc)
            raise DataServerError(
                f"{self.program} failed to listen on {self.spec.listen_host} ports "
                f"{','.join(map(str, self.spec.ports))}: {detail}") from None
        except BaseException:
            await self._reap_group(self.child.pid)
            raise
        log.info("%s pid %d serving session %s/%s on %s ports %s -> %s", self.program,
                 self.child.pid, self.spec.uid, self.spec.role, self.spec.listen_host,
                 list(self.spec.ports), list(self.spec.targets))

    async def retarget(self, targets: tuple[str, ...]) -> None:
        async with self._lock:
            if self.child is None or not self.child.running:
                raise DataServerError(f"{self.program} for session {self.spec.uid} is not running")
            new = self.spec.with_targets(tuple(targets))
            self._check_spec(new)
            old_spec, old_text = self.spec, self.conf_path.read_text()
            self.spec = new
            try:
                await self._install_config(self.render())
                await self.reload()
            except BaseException:
                self.spec = old_spec
                write_private(self.conf_path, old_text)
                raise
            log.info("%s pid %d of session %s/%s retargeted -> %s", self.program, self.child.pid,
                     self.spec.uid, self.spec.role, list(targets))

    async def stop(self) -> None:
        child = self.child
        if child is None:
            return
        await child.stop()
        await self._reap_group(child.pid)

    async def wait_exit(self) -> str:
        while True:
            child = self.child
            if child is None:
                raise DataServerError(f"{self.program} was never started")
            reason = await child.wait()
            if child is self.child:  # else a restart replaced it: watch the new one
                return reason

    def handle(self) -> dict[str, Any]:
        return {"pid": self.child.pid if self.child else None, "config": str(self.conf_path),
                "log": str(self.log_path), "binary": self.binary}

    @classmethod
    async def adopt(cls, spec: DataSpec, handle: dict[str, Any]) -> "ProxyServer":
        pid = handle.get("pid")
        conf = str(handle.get("config") or "")
        if not isinstance(pid, int) or not pid_alive(pid) or conf not in " ".join(cmdline(pid)):
            raise DataServerError(f"{cls.program} of session {spec.uid} (pid {pid}) is gone")
        self = cls(spec)
        self.binary = handle.get("binary") or cls.binary_path()
        self._addrs = await resolve_host(spec.listen_host)
        shown = wankeys.leaf_end(spec.workdir / "wan-cert.pem")   # the leaf the running proxy loaded
        self._credentials()
        if self.renew_at:
            self.renew_at = wankeys.renew_at(shown, spec.lease_end) if shown else time.time()
        self.child = ChildProcess.adopt(pid, cls.program, Path(handle.get("log") or self.log_path))
        missing = self._missing_ports()
        if missing:
            raise DataServerError(f"{cls.program} pid {pid} of session {spec.uid} no longer listens "
                                  f"on ports {sorted(missing)}")
        log.info("adopted %s pid %d of session %s/%s", cls.program, pid, spec.uid, spec.role)
        return self

    @property
    def pids(self) -> list[int]:
        if self.child is None:
            return []
        return sorted(set(group_members(self.child.pid)) | ({self.child.pid} if self.child.running else set()))

    # -- helpers ----------------------------------------------------------------------
    @staticmethod
    def _check_spec(spec: DataSpec) -> None:
        if not spec.ports:
            raise InvalidArgument("a data server needs at least one port")
        if len(spec.targets) != len(spec.ports):
            raise InvalidArgument(f"{len(spec.ports)} ports but {len(spec.targets)} targets")
        parse_listener(format_listener(spec.listen_host, 1))
        for t in spec.targets:
            parse_listener(t)

    def _credentials(self) -> None:
        if self.spec.wan_secret is not None:
            self.creds = wankeys.write_credentials(self.spec.wan_secret, self.spec.uid, self.spec.workdir,
                                                   not_after=wankeys.leaf_until(self.spec.lease_end))
            if type(self).shows_certificate:
                self.renew_at = wankeys.renew_at(self.creds.creds.not_after, self.spec.lease_end)

    async def renew_credentials(self) -> None:
        """A new leaf in the session's files, then a reload: new connections get it."""
        if self.spec.wan_secret is None or not type(self).shows_certificate:
            return
        async with self._lock:
            if self.child is None or not self.child.running:
                return
            self._credentials()
            await self.reload()
        log.info("%s of session %s/%s: WAN certificate issued again, until %s", self.program, self.spec.uid,
                 self.spec.role, self.creds.creds.not_after if self.creds else "?")

    def _warn_unenforced(self) -> None:
        """Once a backend class: a rate or a connection cap asked of a backend that cannot enforce it."""
        cls, spec = type(self), self.spec
        for asked, able, flag, what, use in (
                (spec.rate_kbps, cls.shapes_rate, "_rate_warned", "does not shape bandwidth: the requested "
                 f"rate ({spec.rate_kbps} kbit/s) is reserved but not enforced", "Nginx or Builtin"),
                (spec.max_conns, cls.caps_conns, "_cap_warned", "cannot cap the connections of a session: "
                 f"the cap ({spec.max_conns}, --max-session-conns) is not enforced", "Haproxy or Nginx")):
            if asked and not able and not getattr(cls, flag):
                setattr(cls, flag, True)
                log.warning("the %s backend %s; use %s to enforce it", cls.kind, what, use)

    def _warn_udp(self) -> None:
        carriage = self.udp_carriage(self.spec)
        if carriage == "withheld":
            log.warning("session %s/%s: %s cannot encrypt datagrams and the WAN leg is encrypted: "
                        "no UDP is carried (s2cs --udp-plaintext carries it in the clear)",
                        self.spec.uid, self.spec.role, self.kind)
        elif carriage == "plaintext":
            log.warning("session %s/%s: UDP crosses the WAN IN THE CLEAR beside the encrypted TCP leg "
                        "(--udp-plaintext)", self.spec.uid, self.spec.role)

    async def _install_config(self, text: str) -> None:
        """Validate ``text`` with the binary's config test, then make it the config."""
        tmp = self.conf_path.with_name(self.conf_path.name + ".new")
        write_private(tmp, text)
        argv = self.validate_argv(tmp)
        if argv is not None:
            code, out = await run_check(argv)
            if code != 0:
                tmp.unlink(missing_ok=True)
                raise DataServerError(f"{self.program} rejected the generated configuration: "
                                      f"{error_lines(out) or out.strip()[-500:]}")
        os.replace(tmp, self.conf_path)

    def _group(self) -> list[int]:
        assert self.child is not None
        return group_members(self.child.pid) or [self.child.pid]

    def _missing_ports(self) -> set[int]:
        pids = self._group()
        missing = set(self.spec.ports) - set(listening(pids, self._addrs))
        if self.carries_udp:
            missing |= set(self.spec.ports) - set(listening(pids, self._addrs, udp=True))
        return missing

    def _listening_in(self, pids: Iterable[int]) -> dict[int, set[int]]:
        """Our ports (-> socket inodes) that ``pids`` hold in LISTEN state."""
        held = listening(pids, self._addrs)
        return {p: held[p] for p in self.spec.ports if p in held}

    async def _taken_over(self, old: set[int]) -> bool:
        """True once every listener is bound and none of the pre-reload workers ``old`` still
        holds one (until then, they may still accept new connections for the old targets)."""
        alive = [pid for pid in old if pid_alive(pid)]
        return not self._missing_ports() and (not alive or not self._listening_in(alive))

    async def _ready(self) -> bool:
        return not self._missing_ports()

    async def _wait_for(self, cond, what: str, timeout: float = RELOAD_TIMEOUT,
                        fail=None) -> None:
        """Poll ``await cond()`` until true; raise with ``fail()``'s text (sync) if it says so."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            if self.child is None or not self.child.running:
                raise DataServerError(f"{what}: {self.child.exit_reason() if self.child else 'not running'}")
            if fail is not None and (why := fail()):
                raise DataServerError(f"{what}: {why}")
            if await cond():
                return
            if time.monotonic() > deadline:
                raise DataServerError(f"{what}: not done within {timeout:.0f} s: {tail(self.log_path)}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _reap_group(self, pgid: int, timeout: float = 5.0) -> None:
        """Kill whatever is left in the process group (orphaned workers) and wait for it."""
        deadline = time.monotonic() + timeout
        while group_members(pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            if time.monotonic() > deadline:
                log.error("processes %s of %s would not die", group_members(pgid), self.program)
                return
            await asyncio.sleep(0.02)

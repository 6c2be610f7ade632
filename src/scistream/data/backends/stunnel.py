"""The stunnel backend (``--type Stunnel`` or ``StunnelSubprocess``): Debian's stunnel 5.68.

One stunnel per session, behind our relay (below), ``foreground = quiet`` with its log
written to a file in the workdir (``output``): the original piped its log to a pipe nobody
read, which froze the data path after a few connections. One service per port, ``accept`` on
``spec.listen_host`` only. PROD services are TLS servers (WAN side) that connect in plain
to the producer (through the relay); CONS services accept plain connections from the
consumer (the relay listens on the session's ports) and are TLS clients towards the PROD
listeners.

* WAN leg with ``spec.wan_secret``: TLS 1.3 with the per-session pre-shared key
  (``PSKsecrets``, identity and key derived from the secret by ``wankeys``). A peer
  without the secret fails the handshake. The CONS side also sets ``verifyChain`` with
  the session certificate as the only CA, so a server that skips the PSK and offers a
  certificate instead is refused.
* Without a secret (legacy clients; only with ``--allow-legacy-plaintext``): stunnel
  cannot forward plain TCP, so it speaks the original's scheme: TLS 1.2, PSK identity
  ``client1`` with the uid (dashes removed) as key, NULL ciphers accepted - interoperable
  with an original StunnelSubprocess gateway, and NOT confidential (anyone who knows
  the uid has the key).
* Retarget: the configs are rewritten and the relay reloads its routes (PROD: the
  producer's endpoints) and has stunnel reload its own on SIGHUP; established connections
  keep going, stunnel's listeners are re-bound.
* Timeouts: ``TIMEOUTidle`` 7 days (default 12 h), TCP keepalive on every socket;
  ``TIMEOUTbusy`` 10 s bounds the TLS handshake (default 300 s; stunnel does not use it
  while a stream carries data). ``TIMEOUTclose`` 7 days too: it is how long stunnel waits,
  once one side of a stream has closed, for the other side's end (its default, 60 s, cut
  off an answer sent later than that, with a clean end of stream on both sides); a
  ``TIMEOUTclose exceeded`` in the log counts as a cut stream.
* Cap (``spec.max_conns``): **not enforced** (stunnel has no such setting; its only
  limit is derived from the file-descriptor limit); a warning is logged once.
* Stats: from the log's "Connection closed" lines (closed connections only).
* Rate: **not shaped** (stunnel has no bandwidth limit); a warning is logged once.
* Half-close: carried whole, through our relay (``stunnel_relay``). Left to itself, stunnel
  (5.68, and the same code up to 5.75) drops the end of some half-closed streams: once a
  stream's far side has closed (stunnel got the TLS close_notify and shut down its write
  side of the plain socket), the plain peer's FIN makes poll() report a hang-up, and if
  stunnel's buffer for the plain side is full at that moment (it is not asking for POLLIN)
  it takes the hang-up for the end of reading: what the kernel still holds is never read,
  and both ends see a clean end of stream. Nothing in stunnel's configuration changes that
  path. So stunnel's plain sides are Unix sockets to the relay, which is the process we
  supervise (stunnel runs as its child) and holds each application's FIN until stunnel has
  read every byte before it; the hang-up then finds nothing unread. ``SCISTREAM_STUNNEL_RELAY=off``
  drives stunnel without it, as the original did: those streams are then counted
  (``Stats.cut_streams``: the log's "Read socket closed (HUP)", hence ``debug = info``) and
  warned about at session start and whenever the count grows.

    server = StunnelServer(DataSpec(uid, "PROD", "127.0.0.1", (5100,), ("10.0.0.5:7000",),
                                    wan_secret=secret, workdir=Path("/var/lib/s2cs/u1-PROD")))
    await server.start()
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from ..spec import DataSpec, Stats
from . import stunnel_relay
from .common import (CONNECT_TIMEOUT_S, HANDSHAKE_TIMEOUT_S, IDLE_TIMEOUT_S, ProxyServer,
                     error_lines, log_since, log_size, short_socket_path, unix_listening,
                     write_private)

log = logging.getLogger(__name__)

_CLOSED = re.compile(r"Connection (?:closed|reset): (\d+) byte\(s\) sent to TLS, (\d+) byte\(s\) sent to socket")
_ACCEPTED = re.compile(r"LOG\d\[(\d+)\]: Service \[[^]]+\] accepted connection")
#: How stunnel stopped reading the plain side of connection N (``debug = info``): "HUP" is a
#: hang-up seen while it was not reading (its buffer full), with the kernel's unread bytes
#: dropped; "readsocket" and "read hangup" are an end of stream read in full.
_READ_CLOSED = re.compile(r"LOG\d\[(\d+)\]: Read socket closed \(([^)]*)\)")
#: Connection N given up while one side was still open (``TIMEOUTclose``): a cut stream.
_CLOSE_TIMEOUT = re.compile(r"LOG\d\[(\d+)\]: transfer: s_poll_wait: TIMEOUTclose exceeded")
#: The relay passed an end on although stunnel had closed with bytes unread (stunnel_relay).
_RELAY_CUT = re.compile(r"^relay: route \d+: stunnel closed the stream with \d+ byte\(s\) unread")
LEGACY_IDENTITY = "client1"
LEGACY_CIPHERS = ("PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305:"
                  "PSK-NULL-SHA384:PSK-NULL-SHA256:PSK-NULL-SHA")


def relay_setting() -> str:
    """``SCISTREAM_STUNNEL_RELAY``: ``on`` (default) or ``off`` (stunnel's own TCP sockets, as
    the original drives it: the end of some half-closed streams is lost, warned and counted;
    for comparison)."""
    value = os.environ.get("SCISTREAM_STUNNEL_RELAY", "on").strip().lower() or "on"
    if value not in ("on", "off"):
        log.warning("SCISTREAM_STUNNEL_RELAY=%r: not on or off; using on", value)
        return "on"
    return value


def _endpoint(text: str) -> str:
    """stunnel wants host:port with a bare IPv6 host (it splits at the last colon)."""
    host, _, port = text.rpartition(":")
    return f"{host.strip('[]')}:{port}"


class StunnelServer(ProxyServer):
    kind = "Stunnel"
    legacy_plaintext = False
    program = "stunnel"
    package = "stunnel4"
    binaries = ("stunnel", "stunnel4")
    env_var = "SCISTREAM_STUNNEL"
    shapes_rate = False
    carries_half_close = True
    #: The applications' sockets go through ``stunnel_relay`` (stunnel's plain sides are
    #: Unix sockets to it). False: stunnel's own TCP sockets, which lose the end of some
    #: half-closed streams (the original's way).
    relayed = True
    shows_certificate = False   # PSK only: no certificate to renew
    #: Seconds stunnel waits, once one side of a stream has closed, for the other's end.
    close_timeout = IDLE_TIMEOUT_S

    def __init__(self, spec: DataSpec) -> None:
        super().__init__(spec)
        self._cut_seen = 0   # cut streams already warned about
        self.relayed = type(self).relayed and relay_setting() == "on"

    @property
    def relay_conf(self) -> Path:
        return self.spec.workdir / "relay.json"

    def plain_path(self, i: int) -> str:
        """The Unix socket between stunnel and the relay for port ``i``."""
        return str(short_socket_path(self.spec.workdir, f"s{i}"))

    @property
    def plain_paths(self) -> set[str]:
        return {self.plain_path(i) for i in range(len(self.spec.ports))}

    def write_relay_conf(self) -> None:
        """The relay's config: CONS, the session's ports -> stunnel's Unix listeners; PROD,
        the Unix sockets stunnel connects to -> the producer's endpoints."""
        write_private(self.relay_conf, json.dumps(self.relay_routes(), indent=1) + "\n")

    def relay_routes(self) -> dict[str, Any]:
        spec, routes = self.spec, []
        for i, (port, target) in enumerate(zip(spec.ports, spec.targets)):
            unix = ["unix", self.plain_path(i)]
            if spec.role == "CONS":
                routes.append({"listen": ["tcp", spec.listen_host.strip("[]"), port], "connect": unix})
            else:
                host, _, tport = _endpoint(target).rpartition(":")
                routes.append({"listen": unix, "connect": ["tcp", host, int(tport)]})
        return {"routes": routes, "keepalive": list(spec.keepalive)}

    @property
    def legacy_psk(self):
        return self.spec.workdir / "legacy-psk.txt"

    def prepare(self) -> None:
        if self.relayed:
            self.write_relay_conf()
            self._remove_plain_paths()   # a killed predecessor's: stunnel will not bind over one
        else:
            log.warning("session %s/%s: stunnel may drop the end of a half-closed stream: once one "
                        "side has closed, bytes the other side sends before it closes can be lost "
                        "with no error on either side (a stunnel defect); such streams are counted "
                        "as cut (s2uc status, scistream_streams_cut_total); use Builtin, Haproxy or "
                        "Nginx for streams that half-close", self.spec.uid, self.spec.role)
        if self.spec.wan_secret is None:
            log.warning("session %s/%s: stunnel without a WAN secret uses the original's uid-derived "
                        "PSK with NULL ciphers: the WAN leg is NOT confidential",
                        self.spec.uid, self.spec.role)
            write_private(self.legacy_psk, f"{LEGACY_IDENTITY}:{self.spec.uid.replace('-', '')}\n")

    def render(self) -> str:
        spec = self.spec
        client = "yes" if spec.role == "CONS" else "no"
        if self.creds is not None:
            tls = [f"PSKsecrets = {self.creds.psk}", "sslVersionMin = TLSv1.3"]
            if spec.role == "CONS":
                tls += ["verifyChain = yes", f"CAfile = {self.creds.ca}"]
        else:
            tls = [f"PSKsecrets = {self.legacy_psk}", "sslVersionMax = TLSv1.2",
                   f"ciphers = {LEGACY_CIPHERS}", "securityLevel = 0"]
        lines = [
            f"; generated by scistream for session {spec.uid} ({spec.role}); rewritten on update",
            "foreground = quiet",
            "pid =",
            f"output = {self.log_path}",
            "syslog = no",
            # info: the "Read socket closed (HUP)" lines that count the cut streams (unrelayed)
            "debug = info",
        ]
        # TCP options on stunnel's TCP sides only: with the relay, the plain side is a Unix
        # socket (the relay sets them on the applications' sockets)
        wan = "r" if spec.role == "CONS" else "l"
        sides = (wan,) if self.relayed else ("l", "r")
        lines += [f"socket = {side}:{opt}=1" for opt in ("TCP_NODELAY", "SO_KEEPALIVE") for side in sides]
        if spec.keepalive[0]:
            idle, interval, count = spec.keepalive
            lines += [f"socket = {side}:{opt}={v}" for side in sides
                      for opt, v in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count))]
        for i, (port, target) in enumerate(zip(spec.ports, spec.targets)):
            accept, connect = f"{spec.listen_host}:{port}", _endpoint(target)
            if self.relayed and spec.role == "CONS":
                accept = self.plain_path(i)
            elif self.relayed:
                connect = self.plain_path(i)
            lines += ["", f"[s2ds-{i}]",
                      f"accept = {accept}",
                      f"connect = {connect}",
                      f"client = {client}",
                      f"TIMEOUTidle = {IDLE_TIMEOUT_S}",
                      # once one side has closed, stunnel waits this long for the other
                      # (default 60 s: a later answer was cut off, silently)
                      f"TIMEOUTclose = {self.close_timeout}",
                      f"TIMEOUTconnect = {CONNECT_TIMEOUT_S}",
                      # the TLS handshake (and nothing on an established stream: transfer
                      # waits are TIMEOUTidle / TIMEOUTclose)
                      f"TIMEOUTbusy = {HANDSHAKE_TIMEOUT_S}",
                      *tls]
        return "\n".join(lines) + "\n"

    def argv(self) -> list[str]:
        if not self.relayed:
            return [self.binary, str(self.conf_path)]
        # by its file, without site (it imports the standard library only): half the memory
        return [sys.executable, "-I", "-S", stunnel_relay.__file__, str(self.relay_conf),
                "--", self.binary, str(self.conf_path)]

    def handle(self) -> dict[str, Any]:
        return {**super().handle(), "relayed": self.relayed}

    @classmethod
    async def adopt(cls, spec: DataSpec, handle: dict[str, Any]) -> "StunnelServer":
        self = await super().adopt(spec, handle)
        self.relayed = bool(handle.get("relayed", False))   # an older control server's: none
        return self

    def _stunnel_listeners(self) -> dict[Any, int]:
        """stunnel's own listeners (port or path -> inode): the session's TCP ports, or with
        the relay on CONS its Unix sockets (the relay holds the TCP ports there)."""
        if self.relayed and self.spec.role == "CONS":
            held = unix_listening(self._group())
            return {p: held[p] for p in self.plain_paths if p in held}
        return {p: min(inodes) for p, inodes in self._listening_in(self._group()).items()}

    async def _ready(self) -> bool:
        return await super()._ready() and (not self.relayed
                                           or self.plain_paths <= set(unix_listening(self._group())))

    async def stop(self) -> None:
        await super().stop()
        if self.relayed:
            self._remove_plain_paths()

    def _remove_plain_paths(self) -> None:
        for path in self.plain_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def reload(self) -> None:
        assert self.child is not None
        offset = log_size(self.log_path)
        old = set(self._stunnel_listeners().values())
        if self.relayed:
            self.write_relay_conf()
        os.kill(self.child.pid, signal.SIGHUP)

        async def done() -> bool:
            # stunnel re-binds its listeners on reload: wait for new sockets on every port
            held = self._stunnel_listeners()
            text = log_since(self.log_path, offset)
            return ("Configuration successful" in text
                    and (not self.relayed or "relay: routes reloaded" in text)
                    and len(held) == len(self.spec.ports)
                    and not set(held.values()) & old)

        def failed() -> str:
            text = log_since(self.log_path, offset)
            return error_lines(text) if "Failed to reload" in text or "relay: reload failed" in text else ""

        await self._wait_for(done, "stunnel reload", fail=failed)

    async def stats(self) -> Stats:
        stats, accepted = Stats(), 0
        reading: set[int] = set()   # connections whose plain side stunnel still reads
        try:
            with open(self.log_path, errors="replace") as f:
                for line in f:
                    if m := _CLOSED.search(line):
                        to_tls, to_socket = int(m.group(1)), int(m.group(2))
                        # CONS: TLS faces the producer side; PROD: TLS faces the consumer side.
                        if self.spec.role == "CONS":
                            stats.bytes_in += to_tls
                            stats.bytes_out += to_socket
                        else:
                            stats.bytes_in += to_socket
                            stats.bytes_out += to_tls
                        stats.total_connections += 1
                    elif _CLOSE_TIMEOUT.search(line) or _RELAY_CUT.search(line):
                        stats.cut_streams += 1
                    elif m := _READ_CLOSED.search(line):
                        conn = int(m.group(1))
                        if conn in reading:
                            reading.discard(conn)
                            # with the relay a hang-up leaves nothing unread: it passes the
                            # end on only once stunnel has read everything before it
                            stats.cut_streams += m.group(2) == "HUP" and not self.relayed
                    elif m := _ACCEPTED.search(line):
                        accepted += 1
                        reading.add(int(m.group(1)))
        except OSError:
            pass
        stats.connections = max(0, accepted - stats.total_connections)
        if stats.cut_streams > self._cut_seen:
            log.warning("session %s/%s: stunnel stopped reading %d more stream(s) at a hang-up with "
                        "bytes possibly unread (%d in all): their receivers may have got a clean "
                        "end of stream with the end missing", self.spec.uid, self.spec.role,
                        stats.cut_streams - self._cut_seen, stats.cut_streams)
            self._cut_seen = stats.cut_streams
        return stats

"""A node service as a member of a facility: registered in the shared store, heartbeating.

    s2ds serve --socket /run/scistream/node.sock --store postgresql://scistream@db/scistream \\
        --node-name dtn1 --address 198.51.100.11 --control 198.51.100.11:5050 \\
        --port-range 5100-5200 --token-file /etc/scistream/node.token

The facility's control servers (``s2cs --facility``, ``scistream.control.facility``) place
sessions on the nodes that registered here. A member

* serves the node service's control protocol on ``--control`` over TLS, with a
  certificate of its own (``STATE_DIR/control.crt``, made on first start) whose PEM it
  writes into its row of the store: control servers trust exactly that certificate (it
  is pinned, no CA involved). The first line on a connection must carry the facility's
  node token (``--token-file``); without it the node obeys nobody;
* upserts its row in ``nodes`` (name, the address its listeners carry, the control
  address, port range, bandwidth, most sessions; an operator's drain is kept) and beats
  every ``--heartbeat`` seconds (the database's clock: hosts' clocks do not matter);
* reports the ports of its range that other programs hold (a TCP and a UDP bind test on
  each port its sessions do not use, at each beat: a session's port carries both), which
  placement skips;
* after each beat, removes the sessions it carries that the store does not list as live
  on it: ones released while it was unreachable, or failed because its heartbeat stopped
  for the control servers' ``--node-timeout`` (a node that comes back stops what the
  store no longer lists). While the database is unreachable it keeps every session: the
  streams flow, and it beats again when the database answers.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from ...addr import format_listener
from ...control import facilitydb as db

log = logging.getLogger(__name__)

SCAN_PER_BEAT = 4096   # ports of the range tried for other programs' use at each heartbeat


class Membership:
    def __init__(self, node, *, store_url: str, name: str, address: str, control: tuple[str, int],
                 port_range: range, max_rate: int = 0, max_sessions: int = 0, token: bytes,
                 heartbeat: float = 2.0, state_dir: Path) -> None:
        self.node = node
        self.store_url = store_url
        self.name = name
        self.address = address
        self.control_host, self.control_port = control
        self.port_range = port_range
        self.max_rate = max_rate
        self.max_sessions = max_sessions
        self.token = token
        self.heartbeat = heartbeat
        self.state_dir = state_dir
        self.store = None
        self.task: asyncio.Task | None = None
        self.cert_pem = ""
        self.lost_db = False
        self._scan = 0                 # where the next scan of the port range starts
        self._held: set[int] = set()   # ports of the range other programs hold

    @property
    def control(self) -> str:
        return format_listener(self.control_host, self.control_port)

    async def start(self) -> None:
        from ...control import tlscert
        from ...control.pgstore import PostgresStore
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.node.port_range = self.port_range
        cert, key = self.state_dir / "control.crt", self.state_dir / "control.key"
        tlscert.ensure_self_signed(cert, key, [self.control_host, self.address])
        self.cert_pem = cert.read_text()
        ctx = tlscert.server_context(cert, key, tls13_only=True)
        self.control_port = await self.node.listen_tcp(self.control_host, self.control_port, ctx, self.token)
        self.store = PostgresStore(self.store_url, node=self.name)
        await self.store.open()         # StoreError: the caller says why and exits
        await self._register()
        self.task = asyncio.create_task(self._beat_loop())
        log.info("node %s registered in %s: listeners on %s, ports %d-%d, control %s", self.name,
                 self.store.path, self.address, self.port_range.start, self.port_range.stop - 1, self.control)

    async def _register(self) -> None:
        await self.store._call(lambda c: db.register_node(
            c, self.name, self.address, self.control, self.cert_pem, self.port_range, self.max_rate,
            self.max_sessions, os.getpid()), "register the node in")

    async def beat(self) -> None:
        """One heartbeat, then stop what the store no longer lists on this node."""
        local = set(self.node.sessions)            # before the query: see reconcile below
        busy = await asyncio.to_thread(self.held_ports, local)
        old = await self.store._call(lambda c: db.beat_node(c, self.name, busy), "beat in")
        if old is None:                            # an operator deleted the row: register again
            await self._register()
        elif old != "up":
            log.warning("node %s is back; the control servers had marked it %s", self.name, old)
        live = await self.store._call(lambda c: db.live(c, node=self.name, lock=False, columns="uid, role"),
                                      "read")
        # a session added after ``local`` was taken is not touched; one in ``local`` had its row
        # written (at its req) before its add, so the query sees it while it is live
        keep = {f"{r['uid']}/{r['role']}" for r in live}
        for sid in sorted(local - keep):
            if sid in self.node.sessions:
                log.warning("node %s: session %s is not live in the store any more; removing it",
                            self.name, sid)
                await self.node.remove(sid)

    def held_ports(self, local: set[str]) -> list[int]:
        """The ports of the range that another program holds on the node's address (placement
        skips them): every port the node's own sessions do not use is tried with a TCP and a
        UDP bind, at most ``SCAN_PER_BEAT`` a beat, round the range."""
        from ..supervise import free_port_check
        mine = {p for sid in local if (e := self.node.sessions.get(sid)) is not None for p in e.cfg["ports"]}
        ports = list(self.port_range)
        n = min(len(ports), SCAN_PER_BEAT)
        window = [ports[(self._scan + i) % len(ports)] for i in range(n)]
        self._scan = (self._scan + n) % len(ports)
        for p in window:
            if p in mine or free_port_check(self.address, p, udp=True):
                self._held.discard(p)
            else:
                self._held.add(p)
        return sorted(self._held - mine)

    async def _beat_loop(self) -> None:
        from ...control.store import StoreError
        while True:
            try:
                await self.beat()
                if self.lost_db:
                    log.warning("node %s: the store answers again", self.name)
                    self.lost_db = False
            except StoreError as exc:
                if not self.lost_db:
                    log.error("node %s: cannot beat (%s); sessions keep running, retrying", self.name, exc)
                self.lost_db = True
            except Exception:  # noqa: BLE001 - the loop must go on
                log.exception("node %s: heartbeat failed", self.name)
            await asyncio.sleep(self.heartbeat)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        if self.store is not None:
            await self.store.close()


def read_token(path: Path) -> bytes:
    """The facility's node token from its file (not readable by other users; its group may
    read it, as Kubernetes mounts a Secret with ``defaultMode: 0440``)."""
    st = path.stat()
    if st.st_mode & 0o007:
        raise ValueError(f"{path} is readable by other users; chmod 600 it")
    token = path.read_bytes().strip()
    if len(token) < 16:
        raise ValueError(f"{path}: the node token must be at least 16 characters "
                         "(head -c 32 /dev/urandom | base64 > FILE)")
    return token

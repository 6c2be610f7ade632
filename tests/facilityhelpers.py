"""A facility on loopback for the tests: PostgreSQL, nodes (``s2ds serve --store``) on their
own loopback addresses, control instances (``s2cs --facility``).

    from facilityhelpers import facility, pg    # fixtures: import them into the test module
    f = facility(nodes=2, instances=2)          # f.url, f.token, f.nodes, f.instances
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, async_wait_until, port_block, wait_until
from pghelpers import running_postgres, sql  # noqa: F401  (re-exported)
from scistream.data.supervise import pid_alive

asyncpg = pytest.importorskip("asyncpg")


@pytest.fixture(scope="module")
def pg():
    with running_postgres() as server:
        yield server


def sql_sync(url: str, query: str, *args):
    """``sql`` from synchronous code that may run inside the test's event loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, sql(url, query, *args)).result(30)


class Node:
    """An ``s2ds serve --store`` process: a node of the facility."""

    def __init__(self, tmp: Path, url: str, token: Path, name: str, address: str, heartbeat: float = 0.3,
                 extra: tuple[str, ...] = ()) -> None:
        self.name, self.address, self.url = name, address, url
        self.dir = tmp / f"node-{name}"
        self.dir.mkdir(exist_ok=True)
        self.range = port_block(20)
        self.args = [str(BIN / "s2ds"), "serve", "--socket", str(self.dir / "node.sock"), "--fresh",
                     "--workers", "1", "--store", url, "--node-name", name, "--address", address,
                     "--control", f"{address}:0", "--port-range", self.range, "--token-file", str(token),
                     "--heartbeat", str(heartbeat), *extra]
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.log = open(self.dir / "s2ds.log", "ab")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.started = time.time()

        def registered() -> bool:
            assert self.proc.poll() is None, (self.dir / "s2ds.log").read_text()[-3000:]
            try:
                rows = sql_sync(self.url, "SELECT state, pid FROM nodes WHERE name = $1", self.name)
            except asyncpg.UndefinedTableError:     # the first node has not migrated the schema yet
                return False
            return bool(rows) and rows[0]["state"] == "up" and rows[0]["pid"] == self.proc.pid
        wait_until(registered, 30, f"node {self.name} registered")

    def kill(self) -> None:
        """kill -9 of the node: the service and its workers (its process group)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with_log = getattr(self, "log", None)
        if with_log is not None and not with_log.closed:
            with_log.close()
        # workers of a killed service notice their channel closed and exit; make sure
        wait_until(lambda: not _group_alive(self.proc.pid), 10, f"node {self.name}'s workers gone")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def facility(pg, tmp_path, s2cs_process):
    """``f = facility(nodes=2, instances=2)``: f.url, f.nodes, f.instances (S2csProcess)."""
    made: list[Node] = []

    class Facility:
        pass

    def make(nodes: int = 2, instances: int = 2, node_timeout: float = 3.0, extra: tuple[str, ...] = (),
             server=None, node_extra: tuple[str, ...] = ()):
        f = Facility()
        db = server or pg
        f.url = db.url(db.createdb())
        f.token = tmp_path / "node.token"
        f.token.write_text(os.urandom(24).hex())
        f.token.chmod(0o600)
        f.nodes = []
        for i in range(nodes):
            n = Node(tmp_path, f.url, f.token, f"dtn{i + 1}", f"127.0.0.{i + 2}", extra=node_extra)
            made.append(n)
            f.nodes.append(n)
        f.node_timeout = node_timeout
        f.instances = [s2cs_process("--facility", "--store", f.url, "--node-token-file", str(f.token),
                                    "--node-timeout", str(node_timeout), *extra) for _ in range(instances)]
        return f
    yield make
    for n in made:
        n.stop()


@contextlib.asynccontextmanager
async def restarted_node(url: str, node):
    """``s2ds restart`` of ``node`` (its service hands its sessions to a successor); yields
    the successor's pid once it is registered and up in the store, and stops it at the end
    (it is not the test's child: through its socket)."""
    sock = str(node.dir / "node.sock")
    out = subprocess.run([str(BIN / "s2ds"), "restart", "--socket", sock], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    new_pid = int(out.stdout.split("->")[1].split(",")[0])
    try:
        async def registered() -> bool:
            r = (await sql(url, "SELECT pid, state FROM nodes WHERE name = $1", node.name))[0]
            return r["pid"] == new_pid and r["state"] == "up"
        await async_wait_until(registered, 15, "the successor registered")
        yield new_pid
    finally:
        subprocess.run([str(BIN / "s2ds"), "stop", "--socket", sock], capture_output=True, timeout=30)
        await async_wait_until(lambda: not pid_alive(new_pid), 15, "the successor stopped")

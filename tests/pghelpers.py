"""A PostgreSQL server of the tests' own (Debian's postgresql-15), in a temporary directory.

    with running_postgres() as pg:         # skips the test if PostgreSQL is not installed
        url = pg.url(pg.createdb())          # a new empty database; unix socket in pg.dir
        url = pg.url(name, tcp=True)         # over TCP on a free loopback port

Run as the ``postgres`` system user when the tests run as root; stopped and removed at
the end. ``stop()``/``start()`` take the database away and bring it back.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import free_port, wait_until


def _pg_bin() -> Path | None:
    for cand in ["/usr/lib/postgresql/15/bin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]:
        if os.access(os.path.join(cand, "postgres"), os.X_OK):
            return Path(cand)
    return None


class Postgres:
    """A PostgreSQL server of the tests' own: ``url(db)``, ``createdb()``, ``stop()``, ``start()``."""

    def __init__(self, bindir: Path) -> None:
        self.bin = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="scistream-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.options: list[str] = []  # more -c settings
        self.user = None
        if os.geteuid() == 0:  # postgres refuses to run as root
            pw = pwd.getpwnam("postgres") if _has_user("postgres") else pwd.getpwnam("nobody")
            self.user = pw.pw_uid
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._dbs = 0

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / args[0]), *args[1:]], user=self.user, check=True,
                              capture_output=True, text=True, cwd=self.dir, timeout=60)

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-k", str(self.dir), "-h", "127.0.0.1",
             "-p", str(self.port), "-c", "fsync=off", "-c", "logging_collector=off", *self.options],
            user=self.user, cwd=self.dir, stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "server.log", "ab"), start_new_session=True)

        def ready() -> bool:
            assert self.proc.poll() is None, (self.dir / "server.log").read_text()[-2000:]
            return subprocess.run([str(self.bin / "pg_isready"), "-q", "-h", str(self.dir), "-p",
                                   str(self.port)]).returncode == 0
        wait_until(ready, timeout=30, what="postgres ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown: clients are disconnected
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def createdb(self) -> str:
        """A new empty database; its name."""
        self._dbs += 1
        name = f"t{self._dbs}_{os.getpid()}"
        self._run("psql", "-h", str(self.dir), "-p", str(self.port), "-U", "postgres", "-q",
                  "-c", f"CREATE DATABASE {name}")
        return name

    def url(self, db: str, *, tcp: bool = False) -> str:
        if tcp:
            return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"
        return f"postgresql://postgres@/{db}?host={self.dir}&port={self.port}"

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@contextlib.contextmanager
def running_postgres():
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (scripts/setup --system installs it)")
    server = Postgres(bindir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.close()


async def sql(url: str, query: str, *args):
    """One query on a fresh connection: its rows."""
    import asyncpg
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()

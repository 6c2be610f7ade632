"""A throwaway local PostgreSQL cluster, for development, tests and benchmarks.

Not for production: the facility store (``control/pgstore.py``) talks to an operator's
PostgreSQL by URL. This module gives a developer a server of its own to point that URL
at: ``initdb`` into a new temporary directory, a ``postgres`` listening on its unix socket
in that directory and on a loopback TCP port, trust authentication, ``fsync=off``;
stopped and the directory removed at the end. It needs the server binaries (Debian's
``postgresql-15``, or any ``/usr/lib/postgresql/*/bin``; ``scripts/setup --system``
installs them). Run as the ``postgres`` system user when the caller is root (postgres
refuses to run as root). The tests wrap it (tests/pghelpers.py, which skips a test when
PostgreSQL is not installed); bench/facility uses it directly.

    with running_postgres(options=["-c", "max_connections=200"]) as pg:
        url = pg.url(pg.createdb())          # a new empty database; unix socket in pg.dir
        url = pg.url(name, tcp=True)         # over TCP on the server's loopback port
        pg.stop(); pg.start()                # take the database away and bring it back
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from ..addr import free_port

log = logging.getLogger(__name__)


class PostgresNotInstalled(RuntimeError):
    """No PostgreSQL server binaries on this machine."""

    def __init__(self) -> None:
        super().__init__("PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/postgres "
                         "(scripts/setup --system installs it)")


def pg_bin() -> Path | None:
    """The directory of the server binaries (15 first, else the newest), or None."""
    for cand in ["/usr/lib/postgresql/15/bin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]:
        if os.access(os.path.join(cand, "postgres"), os.X_OK):
            return Path(cand)
    return None


async def sql(url: str, query: str, *args):
    """One query on a fresh connection (asyncpg): its rows."""
    import asyncpg
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


class Postgres:
    """A PostgreSQL server in a temporary directory: ``init()``, ``start()``, ``stop()``,
    ``close()``; ``url(db)``, ``createdb()``, ``psql(db, sql)``, ``pids()``.

    ``port``: its TCP port on 127.0.0.1; 0 picks a free one. A server that is stopped and
    started again needs its port back: pass one outside the kernel's ephemeral range,
    where an outgoing connection cannot take it meanwhile."""

    def __init__(self, bindir: Path, options: Sequence[str] = (), *, prefix: str = "scistream-pg-",
                 port: int = 0) -> None:
        self.bin = bindir
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.data = self.dir / "data"
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.options = list(options)
        self.user: int | None = None
        if os.geteuid() == 0:  # postgres refuses to run as root
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pw = pwd.getpwnam("nobody")
            self.user = pw.pw_uid
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._dbs = 0

    def _as_user(self, argv: list[str]) -> list[str]:
        """``argv`` run as the server's user: through setpriv rather than Popen's ``user=``,
        which makes CPython fork() where it would vfork(). A fork in a process whose other
        threads are inside gRPC (the tests', the benches') runs gRPC's fork handlers; a
        restarted server was seen to die without a word at that moment."""
        if self.user is None:
            return argv
        pw = pwd.getpwuid(self.user)
        return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", *argv]

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self._as_user([str(self.bin / args[0]), *args[1:]]), check=True,
                              capture_output=True, text=True, cwd=self.dir, timeout=60)

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")

    def start(self, timeout: float = 30) -> None:
        """Start the server and return once it accepts connections (RuntimeError with the
        end of its log if it exits, or is not ready within ``timeout`` seconds)."""
        with open(self.dir / "server.log", "ab") as server_log:
            self.proc = subprocess.Popen(self._as_user(
                [str(self.bin / "postgres"), "-D", str(self.data), "-k", str(self.dir), "-h", "127.0.0.1",
                 "-p", str(self.port), "-c", "fsync=off", "-c", "logging_collector=off", *self.options]),
                cwd=self.dir, stdout=subprocess.DEVNULL, stderr=server_log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
                raise RuntimeError(f"postgres (pid {self.proc.pid}) exited, {how}: "
                                   + (self.dir / "server.log").read_text()[-2000:])
            if subprocess.run([str(self.bin / "pg_isready"), "-q", "-h", str(self.dir), "-p",
                               str(self.port)]).returncode == 0:
                log.debug("postgres (pid %d) ready in %s, port %d", self.proc.pid, self.dir, self.port)
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready after {timeout:g} s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown: clients are disconnected
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def psql(self, db: str, sql: str) -> str:
        return self._run("psql", "-h", str(self.dir), "-p", str(self.port), "-U", "postgres", "-d", db,
                         "-q", "-At", "-c", sql).stdout

    def createdb(self) -> str:
        """A new empty database; its name."""
        self._dbs += 1
        name = f"t{self._dbs}_{os.getpid()}"
        self.psql("postgres", f"CREATE DATABASE {name}")
        return name

    def url(self, db: str, *, tcp: bool = False) -> str:
        """The database's URL: over the unix socket in ``dir``, or TCP on loopback."""
        if tcp:
            return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"
        return f"postgresql://postgres@/{db}?host={self.dir}&port={self.port}"

    def pids(self) -> list[int]:
        """The postmaster and every backend and helper process under it."""
        if self.proc is None:
            return []
        out = [self.proc.pid]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    text = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                if int(text.rpartition(")")[2].split()[1]) == self.proc.pid:
                    out.append(int(entry))
        return out

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running_postgres(options: Sequence[str] = (), port: int = 0) -> Iterator[Postgres]:
    """A new cluster, started; stopped and removed on exit. ``options``: extra ``postgres``
    arguments (``["-c", "name=value", ...]``). PostgresNotInstalled without the binaries."""
    bindir = pg_bin()
    if bindir is None:
        raise PostgresNotInstalled()
    server = Postgres(bindir, options, port=port)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.close()

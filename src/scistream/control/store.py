"""Durable session state: the store interface and its SQLite implementation.

The session registry writes a session's record here at every change of state, *before*
the call that caused it is answered, so a control server killed at any moment can be
restarted and re-adopt what was running (``scistream.control.recovery``).

``SessionStore`` is the interface. ``SqliteStore`` keeps the records in an embedded
SQLite database in the state directory (WAL journal, ``synchronous=NORMAL``: a commit
survives a crash of ``s2cs``; an operating-system crash may undo the last ones, with the
data servers they describe - docs/performance.md measures why; file mode
0600; the schema's version in ``PRAGMA user_version``, a newer one refused). ``PostgresStore`` (``scistream.control.pgstore``, ``s2cs --store postgresql://...``)
implements the same coroutines for several gateway nodes on one shared database, over a
table keyed by ``(node, uid, role, created)`` with ``INSERT ... ON CONFLICT DO UPDATE``;
every query filters on the node's name, so each node re-adopts only its own sessions.

The WAN secret of a live session is stored (a restarted server needs it to restart a
data server or to check a later update); it is erased from the record when the session
ends. It is protected like the session's key files that the data servers read: the state
directory is 0700, the database and its journals 0600.

SQLite runs on one thread of its own, never on the event loop and never a thread per
call. Writes that arrive while one is committing are committed together in the next
transaction (group commit), so N concurrent sessions cost far fewer than N fsyncs.

    store = SqliteStore(state_dir / "sessions.db")
    await store.open()
    await store.put(record)                 # durable when this returns
    live = await store.active()             # after a restart
    await store.close()
"""
from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import socket
import sqlite3
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..errors import ScistreamError, Status

log = logging.getLogger(__name__)

T = TypeVar("T")

TERMINAL_STATES = ("released", "expired", "failed")


@dataclasses.dataclass
class SessionRecord:
    """What a store keeps of one session; ``data`` holds the rest as JSON."""

    uid: str
    role: str
    created: float
    state: str
    owner_id: str
    owner_name: str = ""
    ended: float = 0.0
    wan_secret: bytes | None = None
    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class StoreError(ScistreamError):
    """The session store cannot be opened or written; the caller may retry later."""

    status = Status.UNAVAILABLE


class SessionStore(abc.ABC):
    """Where session records live; every coroutine is safe to call from the event loop.

    ``put`` queues the record; one flusher task at a time (``_flush``) writes whatever is
    queued, in order, in one transaction per batch (``_write_batch``). A subclass connects
    (``open``, ``_disconnect``, ``is_open``) and runs the statements (``_fetch``,
    ``_execute``; parameters written ``$1``, ``$2``)."""
    path: Any
    node: str

    def __init__(self) -> None:
        self._pending: list[tuple[SessionRecord, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self.commits = 0   # transactions committed (group commit makes it < records written)

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create the schema if needed; raise StoreError saying why not."""

    @property
    @abc.abstractmethod
    def is_open(self) -> bool: ...

    @abc.abstractmethod
    async def _disconnect(self) -> None: ...

    @abc.abstractmethod
    async def _write_batch(self, records: list[SessionRecord]) -> None:
        """Insert or replace the records in one transaction."""

    @abc.abstractmethod
    async def _fetch(self, query: str, *args: Any) -> list[Any]: ...

    @abc.abstractmethod
    async def _execute(self, query: str, *args: Any) -> int:
        """Run a statement; the number of rows it changed."""

    def _write_failed(self, records: list[SessionRecord], exc: BaseException) -> StoreError:
        """What every waiter of a batch that could not be written learns."""
        return exc if isinstance(exc, StoreError) else StoreError(
            f"cannot write the session store {self.path}: {exc}")

    async def close(self) -> None:
        """Finish pending writes and disconnect. Idempotent."""
        if not self.is_open:
            return
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self._disconnect()

    async def put(self, record: SessionRecord) -> None:
        """Insert or replace the record; durable when this returns."""
        if not self.is_open:
            raise StoreError(f"session store {self.path} is not open")
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((record, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        # The write goes on even if the caller is cancelled: the state it records is real.
        await asyncio.shield(fut)

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            records = [r for r, _ in batch]
            try:
                await self._write_batch(records)
            except BaseException as exc:  # noqa: BLE001 - every waiter must learn of it
                _settle(batch, self._write_failed(records, exc))
                if isinstance(exc, asyncio.CancelledError):
                    raise
            else:
                _settle(batch, None)

    async def active(self) -> list[SessionRecord]:
        """Every session of this node not yet in a terminal state."""
        return [record_of(r) for r in await self._fetch(
            f"SELECT {SELECTED} FROM sessions WHERE node = $1 AND {LIVE} ORDER BY created", self.node)]

    async def history(self, limit: int) -> list[SessionRecord]:
        """The ``limit`` most recently ended sessions of this node, newest first."""
        return [record_of(r) for r in await self._fetch(
            f"SELECT {SELECTED} FROM sessions WHERE node = $1 AND NOT ({LIVE}) "
            "ORDER BY ended DESC LIMIT $2", self.node, limit)]

    async def prune(self, keep: int) -> int:
        """Forget all but the ``keep`` most recently ended sessions; return how many went."""
        return await self._execute(
            f"DELETE FROM sessions WHERE node = $1 AND NOT ({LIVE}) AND (uid, role, created) NOT IN ("
            f"SELECT uid, role, created FROM sessions WHERE node = $1 AND NOT ({LIVE}) "
            "ORDER BY ended DESC LIMIT $2)", self.node, keep)


def _settle(batch: list[tuple[SessionRecord, asyncio.Future]], err: BaseException | None) -> None:
    """Tell every waiter of a batch how its write went."""
    for _, fut in batch:
        if not fut.done():
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(err)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    node TEXT NOT NULL,
    uid TEXT NOT NULL,
    role TEXT NOT NULL,
    created REAL NOT NULL,
    state TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    owner_name TEXT NOT NULL DEFAULT '',
    ended REAL NOT NULL DEFAULT 0,
    wan_secret BLOB,
    data TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (node, uid, role, created)
);
CREATE INDEX IF NOT EXISTS sessions_live ON sessions (node, state);
CREATE INDEX IF NOT EXISTS sessions_ended ON sessions (node, ended);
"""

#: The schema's version, kept in SQLite's ``user_version``; a newer file is refused.
SQLITE_SCHEMA_VERSION = 1

#: What both stores (SQLite here, PostgreSQL in pgstore) read and write of a record, in
#: this order: ``values_of(node, record)`` and ``record_of(row)`` convert, ``LIVE`` selects the
#: sessions not ended.
COLUMNS = ("uid", "role", "created", "state", "owner_id", "owner_name", "ended", "wan_secret", "data")
SELECTED = ", ".join(COLUMNS)
WRITTEN = "node, " + SELECTED
LIVE = "state NOT IN ('released', 'expired', 'failed')"


def values_of(node: str, r: SessionRecord) -> tuple:
    """The values of ``WRITTEN`` for a record (an ended session's secret is not kept)."""
    return (node, r.uid, r.role, r.created, r.state, r.owner_id, r.owner_name, r.ended,
            None if r.terminal else r.wan_secret, json.dumps(r.data, separators=(",", ":")))


def record_of(values: Any) -> SessionRecord:
    """The record of a row of ``SELECTED`` (a tuple, or a mapping such as asyncpg's Record)."""
    got = dict(zip(COLUMNS, values)) if isinstance(values, tuple) else dict(values)
    secret = got["wan_secret"]
    return SessionRecord(**{**got, "wan_secret": bytes(secret) if secret is not None else None,
                            "data": json.loads(got["data"])})


class SqliteStore(SessionStore):
    """Session records in one SQLite file (WAL), written on a thread of its own."""

    def __init__(self, path: Path, node: str | None = None, *, synchronous: str = "NORMAL") -> None:
        super().__init__()
        self.path = Path(path)
        self.node = node or socket.gethostname()
        self.synchronous = synchronous
        self._db: sqlite3.Connection | None = None
        self._exec: concurrent.futures.ThreadPoolExecutor | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._exec is None:
            raise StoreError(f"session store {self.path} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        if self._exec is not None:
            return
        self._exec = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="scistream-store")
        try:
            await self._run(self._open_sync)
        except BaseException:
            self._exec.shutdown(wait=False)
            self._exec = None
            raise

    def _open_sync(self) -> None:
        try:
            # Create the file 0600 ourselves: SQLite would use the umask, and gives its
            # -wal and -shm files the mode of the database file.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(self.path, 0o600)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("session store %s: journal mode %s, not WAL", self.path, mode)
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            db.execute("PRAGMA secure_delete=ON")  # erased secrets do not linger in free pages
            db.execute("PRAGMA busy_timeout=5000")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SQLITE_SCHEMA_VERSION:
                db.close()
                raise StoreError(
                    f"the session store {self.path} has schema version {version}, newer than this "
                    f"scistream knows ({SQLITE_SCHEMA_VERSION}); upgrade scistream, or give s2cs "
                    "another --state-dir")
            db.executescript(_SCHEMA)  # version 1 (a file from before versions is version 1 too)
            if version < SQLITE_SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version={SQLITE_SCHEMA_VERSION}")
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the session store {self.path}: {exc}; check the "
                             "--state-dir (its owner, free space) or move the damaged file away") from exc
        self._db = db

    async def _disconnect(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await self._run(db.close)
        self._exec.shutdown(wait=True)  # type: ignore[union-attr]
        self._exec = None

    # -- writes (group commit) and reads ---------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._exec is not None

    async def _write_batch(self, records: list[SessionRecord]) -> None:
        await self._run(self._write_sync, records)

    def _write_sync(self, records: list[SessionRecord]) -> None:
        db = self._need_db()
        rows = [values_of(self.node, r) for r in records]
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(f"INSERT OR REPLACE INTO sessions ({WRITTEN}) VALUES "
                           f"({', '.join('?' * (len(COLUMNS) + 1))})", rows)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreError(f"cannot write the session store {self.path}: {exc}") from exc
        self.commits += 1

    def _need_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"session store {self.path} is not open")
        return self._db

    async def _fetch(self, query: str, *args: Any) -> list[Any]:
        return await self._run(lambda: self._need_db().execute(query.replace("$", "?"), args).fetchall())

    async def _execute(self, query: str, *args: Any) -> int:
        return await self._run(lambda: self._need_db().execute(query.replace("$", "?"), args).rowcount)

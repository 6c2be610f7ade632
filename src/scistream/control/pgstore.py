"""Session records in PostgreSQL: ``s2cs --store postgresql://USER@HOST/DB``.

The same ``SessionStore`` contract as ``SqliteStore`` (``scistream.control.store``), over
one table shared by several gateway nodes, keyed by ``(node, uid, role, created)`` and
written with ``INSERT ... ON CONFLICT DO UPDATE``. Every query filters on this node's
name, so a node reads, re-adopts and prunes only its own sessions.

Connections come from an asyncpg pool. The URL is libpq's: TLS to the database with
``?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem`` (``sslcert``/``sslkey`` for a
client certificate), a unix socket with ``?host=/run/postgresql``, the password from
``~/.pgpass`` or ``PGPASSWORD`` rather than in the URL. The password never appears in a
message or a log line (``redact``).

Schema migrations are numbered; on ``open`` the store takes an advisory lock, applies the
ones the database lacks and records each in ``schema_version``. A database whose schema is
newer than this code knows is refused (``StoreError``; ``s2cs`` exits 2 with that line).

Writes are group-committed as in ``SqliteStore``: records that arrive while one
transaction is committing go together in the next one (one WAL flush for many sessions).
When the database is unreachable, a write fails with ``StoreError`` (gRPC UNAVAILABLE,
"session store unavailable"); the end of a session (a terminal record, which the
registry does not undo) is kept and written as soon as the database answers again, so
no release or expiry is lost. The WAN secret of an ended session is erased (NULL).

    store = PostgresStore("postgresql://scistream@db.facility.org/scistream?sslmode=verify-full",
                          node="dtn1")
    await store.open()          # migrations applied
    await store.put(record)     # committed when this returns
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import urllib.parse
from typing import Any

from ..errors import ScistreamError
from . import facilitydb
from .store import COLUMNS, WRITTEN, SessionRecord, SessionStore, StoreError, values_of

log = logging.getLogger(__name__)

#: Migrations, in order: ``MIGRATIONS[n - 1]`` takes the schema from version n-1 to n.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sessions (
        node TEXT NOT NULL,
        uid TEXT NOT NULL,
        role TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL,
        owner_id TEXT NOT NULL,
        owner_name TEXT NOT NULL DEFAULT '',
        ended DOUBLE PRECISION NOT NULL DEFAULT 0,
        wan_secret BYTEA,
        data JSONB NOT NULL DEFAULT '{}',
        PRIMARY KEY (node, uid, role, created)
    );
    CREATE INDEX sessions_live ON sessions (node, state);
    CREATE INDEX sessions_ended ON sessions (node, ended);
    """,
    # 2 to 4: a facility of several nodes (its tables: control/facilitydb.py)
    *facilitydb.MIGRATIONS,
)
SCHEMA_VERSION = len(MIGRATIONS)
#: pg_advisory_xact_lock key that serialises migrations of several starting servers.
_MIGRATION_LOCK = 0x5C157AE0

_UPSERT = (
    f"INSERT INTO sessions ({WRITTEN}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb) "
    "ON CONFLICT (node, uid, role, created) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS[3:]))


async def _light_reset(conn: Any) -> None:
    """What a connection needs when it goes back to the pool. asyncpg's default sends
    ``CLOSE ALL; UNLISTEN *; RESET ALL; SELECT pg_advisory_unlock_all()`` (a round trip
    each time); these connections hold no cursor, LISTEN, setting or session lock (the
    facility listens on a connection of its own, locks are transactions'), so only a
    transaction left open by an error could remain, and it is rolled back."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def redact(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "postgresql://..."
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def is_postgres_url(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


class PostgresStore(SessionStore):
    """Session records of one node in a PostgreSQL database shared by several nodes."""

    def __init__(self, url: str, node: str | None = None, *, pool_size: int = 4,
                 timeout: float = 10.0) -> None:
        if not is_postgres_url(url):
            raise StoreError(f"--store {redact(url)}: give a postgresql://USER@HOST[:PORT]/DATABASE URL")
        super().__init__()
        self.url = url
        self.path = redact(url)  # what logs and messages show
        self.node = node or socket.gethostname()
        self.pool_size = pool_size
        self.timeout = timeout
        self._pool: Any = None
        self._unsaved: dict[tuple[str, str, float], SessionRecord] = {}  # ends not yet written
        self._retry: asyncio.Task | None = None

    def _unavailable(self, exc: BaseException, doing: str) -> StoreError:
        detail = str(exc).strip() or type(exc).__name__
        return StoreError(f"session store unavailable: cannot {doing} {self.path}: {detail}")

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            import asyncpg
        except ImportError as exc:  # pragma: no cover - a dependency of scistream
            raise StoreError(f"--store {self.path} needs the asyncpg package: {exc}") from None
        pool = None
        try:
            pool = await asyncpg.create_pool(self.url, min_size=0, max_size=self.pool_size,
                                             timeout=self.timeout, command_timeout=self.timeout,
                                             reset=_light_reset)
            # with no connection kept open, the first one is made here: an unreachable
            # database, refused credentials or TLS show up now
            await self._migrate(pool)
        except BaseException as exc:  # noqa: BLE001 - unreachable, refused, bad URL, TLS, auth
            if pool is not None:
                pool.terminate()
            if isinstance(exc, StoreError) or not isinstance(exc, Exception):
                raise
            raise StoreError(f"cannot open the session store {self.path}: "
                             f"{str(exc).strip() or type(exc).__name__}; check the --store URL, "
                             "the database's address and credentials") from None
        self._pool = pool

    async def _migrate(self, pool: Any) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                "applied TIMESTAMPTZ NOT NULL DEFAULT now())")
            have = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
            if have > SCHEMA_VERSION:
                raise StoreError(
                    f"the session store {self.path} has schema version {have}, newer than this "
                    f"scistream knows ({SCHEMA_VERSION}); upgrade scistream, or point --store at "
                    "another database")
            for version in range(have + 1, SCHEMA_VERSION + 1):
                await conn.execute(MIGRATIONS[version - 1])
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
                log.info("session store %s: schema migrated to version %d", self.path, version)

    async def _disconnect(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            await asyncio.gather(self._retry, return_exceptions=True)
            self._retry = None
        if self._unsaved:  # one last try for the ends the database missed
            try:
                await self._write_batch([])
            except StoreError as exc:
                log.error("session store %s: %d ended session(s) not recorded: %s",
                          self.path, len(self._unsaved), exc)
        pool, self._pool = self._pool, None
        try:
            await asyncio.wait_for(pool.close(), self.timeout)
        except Exception:  # noqa: BLE001 - a dead database: drop the connections
            pool.terminate()

    # -- one call, retried once on a connection the database has dropped -------------------
    async def _call(self, fn: Any, doing: str) -> Any:
        import asyncpg
        if self._pool is None:
            raise StoreError(f"session store {self.path} is not open")
        for attempt in (0, 1):
            try:
                async with self._pool.acquire(timeout=self.timeout) as conn:
                    return await fn(conn)
            except ScistreamError:   # StoreError, or a caller's own answer from inside fn
                raise
            except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, ConnectionError) as exc:
                # A pooled connection from before a database restart fails once; a fresh one
                # may not. Every statement here is idempotent, so trying again is safe.
                if attempt == 0 and not isinstance(exc, ConnectionRefusedError):
                    continue
                raise self._unavailable(exc, doing) from None
            except Exception as exc:  # noqa: BLE001 - OSError, timeouts, server errors
                raise self._unavailable(exc, doing) from None
        raise AssertionError("unreachable")

    # -- writes (group commit) -------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._pool is not None

    def _write_failed(self, records: list[SessionRecord], exc: BaseException) -> StoreError:
        for r in records:
            if r.terminal:  # an end is final: write it when the database is back
                self._unsaved[(r.uid, r.role, r.created)] = dataclasses.replace(r, data=dict(r.data))
        if self._unsaved and (self._retry is None or self._retry.done()):
            self._retry = asyncio.create_task(self._retry_unsaved())
        return exc if isinstance(exc, StoreError) else self._unavailable(exc, "write")

    async def _retry_unsaved(self, every: float = 1.0) -> None:
        while self._unsaved and self._pool is not None:
            await asyncio.sleep(every)
            if self._flusher is not None and not self._flusher.done():
                continue  # the flusher writes them with its batch
            count = len(self._unsaved)
            try:
                await self._write_batch([])
            except StoreError:
                continue
            log.info("session store %s: back; %d ended session(s) recorded", self.path, count)

    async def _write_batch(self, records: list[SessionRecord]) -> None:
        """The records, and the ends an earlier batch could not write, in one transaction."""
        earlier = dict(self._unsaved)
        rows = [values_of(self.node, r) for r in [*earlier.values(), *records]]

        async def write(conn: Any) -> None:
            async with conn.transaction():
                await conn.executemany(_UPSERT, rows)
        await self._call(write, "write")
        self.commits += 1
        for key, rec in earlier.items():
            if self._unsaved.get(key) is rec:
                del self._unsaved[key]

    async def _fetch(self, query: str, *args: Any) -> list[Any]:
        return await self._call(lambda c: c.fetch(query, *args), "read")

    async def _execute(self, query: str, *args: Any) -> int:
        return int((await self._call(lambda c: c.execute(query, *args), "prune")).split()[-1])

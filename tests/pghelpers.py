"""A PostgreSQL server of the tests' own (Debian's postgresql-15), in a temporary directory
(``bench/pg.py``'s ``Postgres``; here the tests' ``running_postgres``, which skips without it).

    with running_postgres() as pg:         # skips the test if PostgreSQL is not installed
        url = pg.url(pg.createdb())          # a new empty database; unix socket in pg.dir
        url = pg.url(name, tcp=True)         # over TCP on a free loopback port

Run as the ``postgres`` system user when the tests run as root; stopped and removed at
the end. ``stop()``/``start()`` take the database away and bring it back.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from pg import Postgres, pg_bin, running_postgres as _running_postgres  # noqa: E402  (bench/pg.py: the one implementation, without pytest)

_pg_bin = pg_bin
__all__ = ["Postgres", "pg_bin", "running_postgres", "sql"]


@contextlib.contextmanager
def running_postgres():
    if pg_bin() is None:
        pytest.skip("PostgreSQL is not installed (scripts/setup --system installs it)")
    with _running_postgres() as server:
        yield server


async def sql(url: str, query: str, *args):
    """One query on a fresh connection: its rows."""
    import asyncpg
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()

"""A PostgreSQL server of the tests' own (Debian's postgresql-15), in a temporary directory
(``scistream.control.pglocal``'s ``Postgres``; here the tests' ``running_postgres``, which
skips without it).

    with running_postgres() as pg:         # skips the test if PostgreSQL is not installed
        url = pg.url(pg.createdb())          # a new empty database; unix socket in pg.dir
        url = pg.url(name, tcp=True)         # over TCP on a free loopback port

Run as the ``postgres`` system user when the tests run as root; stopped and removed at
the end. ``stop()``/``start()`` take the database away and bring it back.
"""
from __future__ import annotations

import contextlib
import socket

import pytest

from scistream.control.pglocal import Postgres, pg_bin, running_postgres as _running_postgres, sql

__all__ = ["Postgres", "pg_bin", "running_postgres", "sql"]


@contextlib.contextmanager
def running_postgres(*, restartable: bool = False):
    """``restartable``: the test stops and starts the server again, so its TCP port comes
    from the tests' reserved blocks (conftest.port_block), below the kernel's ephemeral range:
    no outgoing connection of the test can take it while the server is down."""
    if pg_bin() is None:
        pytest.skip("PostgreSQL is not installed (scripts/setup --system installs it)")
    with _running_postgres(port=_reserved_port() if restartable else 0) as server:
        yield server


def _reserved_port() -> int:
    from conftest import port_block
    first, last = map(int, port_block(8).split("-"))
    for port in range(first, last + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue            # held by another program: the next one
            return port
    raise RuntimeError(f"no free port in {first}-{last}")

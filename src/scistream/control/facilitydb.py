"""The facility's tables and every statement on them, for both sides of a facility.

The control servers (``s2cs --facility``, ``control/facility.py``) place, change and end
sessions; the nodes (``s2ds serve --store``, ``data/node/facility.py``) register and beat.
Both speak to the same PostgreSQL through a ``PostgresStore`` (``control/pgstore.py``, which
applies ``MIGRATIONS`` as its schema versions 2 to 4). Every function takes an asyncpg
connection (what ``PostgresStore._call`` hands its callback) and returns rows; the
decisions stay with the callers. This module imports nothing of scistream, so each side
imports it without loading the other.

* ``nodes``: one row a node (its addresses, pinned certificate, port range, limits, state,
  heartbeat by the database's clock, the ports other programs hold).
* ``fsessions``: one row a session, placed on one node. A port or some bandwidth is
  reserved while a live row lists it; the node's row lock serialises placement; a change
  of a session's state is announced on ``CHANNEL`` (``LISTEN``/``NOTIFY``).
* ``instances``: the control servers of the facility, for ``s2cs nodes list``.
"""
from __future__ import annotations

from typing import Any

LIVE = "('requested', 'ready', 'connected')"
CHANNEL = "scistream_fsessions"

#: PostgresStore's schema versions 2 to 4 (version 1 is the node-local ``sessions`` table).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        control TEXT NOT NULL,
        cert TEXT NOT NULL,
        port_lo INTEGER NOT NULL,
        port_hi INTEGER NOT NULL,
        max_rate BIGINT NOT NULL DEFAULT 0,
        max_sessions INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL DEFAULT 'up',
        drained BOOLEAN NOT NULL DEFAULT false,
        reason TEXT NOT NULL DEFAULT '',
        pid INTEGER NOT NULL DEFAULT 0,
        registered TIMESTAMPTZ NOT NULL DEFAULT now(),
        heartbeat TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE TABLE fsessions (
        uid TEXT NOT NULL,
        role TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL,
        owner_id TEXT NOT NULL,
        owner_name TEXT NOT NULL DEFAULT '',
        node TEXT NOT NULL,
        instance TEXT NOT NULL,
        num_conn INTEGER NOT NULL,
        rate BIGINT NOT NULL DEFAULT 0,
        bandwidth BIGINT NOT NULL DEFAULT 0,
        ports INTEGER[] NOT NULL,
        listeners TEXT[] NOT NULL,
        prod_listeners TEXT[] NOT NULL DEFAULT '{}',
        targets TEXT[] NOT NULL DEFAULT '{}',
        wan_secret BYTEA,
        wan_security TEXT NOT NULL DEFAULT '',
        rate_enforced BOOLEAN NOT NULL DEFAULT true,
        hello_due DOUBLE PRECISION NOT NULL DEFAULT 0,
        update_due DOUBLE PRECISION NOT NULL DEFAULT 0,
        lease_expires DOUBLE PRECISION NOT NULL DEFAULT 0,
        ready_at DOUBLE PRECISION NOT NULL DEFAULT 0,
        connected_at DOUBLE PRECISION NOT NULL DEFAULT 0,
        ended DOUBLE PRECISION NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT '',
        stats JSONB NOT NULL DEFAULT '{}',
        PRIMARY KEY (uid, role, created)
    );
    CREATE UNIQUE INDEX fsessions_one_live ON fsessions (uid, role)
        WHERE state IN ('requested', 'ready', 'connected');
    CREATE INDEX fsessions_node_live ON fsessions (node)
        WHERE state IN ('requested', 'ready', 'connected');
    CREATE INDEX fsessions_ended ON fsessions (ended);
    CREATE TABLE instances (
        name TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started TIMESTAMPTZ NOT NULL DEFAULT now(),
        heartbeat TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    """,
    # 3: the ports of its range that a node found held by other programs (skipped by placement)
    """
    ALTER TABLE nodes ADD COLUMN busy_ports INTEGER[] NOT NULL DEFAULT '{}';
    """,
    # 4: how a session carries UDP beside TCP ("off", "plain", "encrypted"; '' before its update)
    """
    ALTER TABLE fsessions ADD COLUMN udp TEXT NOT NULL DEFAULT '';
    """,
)

_KEY = "uid = $1 AND role = $2 AND created = $3"   # one session row


# -- a node (data/node/facility.py) ------------------------------------------------------
async def register_node(c: Any, name: str, address: str, control: str, cert: str, ports: range,
                        max_rate: int, max_sessions: int, pid: int) -> None:
    """Insert or refresh the node's row: up, no reason, heartbeat now; an operator's drain is kept."""
    await c.execute(
        "INSERT INTO nodes (name, address, control, cert, port_lo, port_hi, max_rate, max_sessions, pid) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (name) DO UPDATE SET "
        "address = EXCLUDED.address, control = EXCLUDED.control, cert = EXCLUDED.cert, "
        "port_lo = EXCLUDED.port_lo, port_hi = EXCLUDED.port_hi, max_rate = EXCLUDED.max_rate, "
        "max_sessions = EXCLUDED.max_sessions, pid = EXCLUDED.pid, state = 'up', reason = '', "
        "heartbeat = now()",
        name, address, control, cert, ports.start, ports.stop - 1, max_rate, max_sessions, pid)


async def beat_node(c: Any, name: str, busy_ports: list[int]) -> str | None:
    """The node's heartbeat; the state its row had before (None: there is no row)."""
    return await c.fetchval(
        "WITH old AS (SELECT state FROM nodes WHERE name = $1) "
        "UPDATE nodes SET heartbeat = now(), state = 'up', reason = '', busy_ports = $2 WHERE name = $1 "
        "RETURNING (SELECT state FROM old)", name, busy_ports)


async def node(c: Any, name: str) -> Any:
    return await c.fetchrow("SELECT * FROM nodes WHERE name = $1", name)


async def nodes_named(c: Any, names: list[str]) -> list[Any]:
    return await c.fetch("SELECT * FROM nodes WHERE name = ANY($1::text[])", names)


async def set_drained(c: Any, name: str, drained: bool) -> bool:
    """False: no node has that name."""
    status = await c.execute("UPDATE nodes SET drained = $2 WHERE name = $1", name, drained)
    return status.split()[-1] != "0"


async def mark_lost(c: Any, node_timeout: float, reason: str) -> list[Any]:
    """Mark ``lost`` every up node whose heartbeat is older than ``node_timeout``; their rows.
    A database that was down missed every heartbeat: nodes are judged only once it has been
    up for a whole ``node_timeout`` (a restart of it must not fail every session)."""
    return await c.fetch(
        "UPDATE nodes SET state = 'lost', reason = $2 WHERE state = 'up' "
        "AND heartbeat < now() - make_interval(secs => $1) "
        "AND now() - pg_postmaster_start_time() > make_interval(secs => $1) RETURNING *",
        node_timeout, reason)


# -- placement ---------------------------------------------------------------------------
async def candidates(c: Any, node_timeout: float) -> list[str]:
    """The nodes up, not drained, with a recent heartbeat: the least loaded first."""
    rows = await c.fetch(
        "SELECT n.name FROM nodes n WHERE n.state = 'up' AND NOT n.drained "
        "AND n.heartbeat > now() - make_interval(secs => $1) ORDER BY "
        f"(SELECT count(*) FROM fsessions f WHERE f.node = n.name AND f.state IN {LIVE}), random()",
        node_timeout)
    return [r["name"] for r in rows]


async def lock_node(c: Any, name: str, *, skip_locked: bool) -> Any:
    """The node's row, locked for this transaction, if it is still up and not drained (None
    also when another transaction holds it and ``skip_locked``)."""
    return await c.fetchrow("SELECT * FROM nodes WHERE name = $1 AND state = 'up' AND NOT drained "
                            "FOR UPDATE" + (" SKIP LOCKED" if skip_locked else ""), name)


async def usage(c: Any, name: str) -> Any:
    """What the node's live sessions hold: ``n`` sessions, ``bw`` kbit/s, ``ports``."""
    return await c.fetchrow(
        "SELECT count(*) AS n, coalesce(sum(bandwidth), 0) AS bw, coalesce((SELECT array_agg(p) "
        f"FROM fsessions f, unnest(f.ports) p WHERE f.node = $1 AND f.state IN {LIVE}), '{{}}') AS ports "
        f"FROM fsessions WHERE node = $1 AND state IN {LIVE}", name)


async def insert_session(c: Any, **values: Any) -> Any:
    """A new row (state ``requested``) from column values, notified; asyncpg's
    UniqueViolationError when the uid and role are live already."""
    cols = list(values)
    row = await c.fetchrow(
        f"INSERT INTO fsessions (state, {', '.join(cols)}) VALUES ('requested', "
        f"{', '.join(f'${i}' for i in range(1, len(cols) + 1))}) RETURNING *", *values.values())
    await notify(c, row["uid"], row["role"])
    return row


# -- sessions ----------------------------------------------------------------------------
async def notify(c: Any, uid: str, role: str) -> None:
    """Wake the instances waiting on ``uid`` (sent when the transaction commits)."""
    await c.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{uid}\n{role}")


async def live(c: Any, *, uid: str = "", role: str = "", node: str = "", lock: bool = True,
               columns: str = "*") -> list[Any]:
    """The live sessions of a uid (and role), or of a node, ordered by role; locked for this
    transaction (``FOR UPDATE``) unless ``lock`` is false."""
    if not (uid or node):
        raise ValueError("facilitydb.live needs a uid or a node")
    where, args = [f"state IN {LIVE}"], []
    for col, value in (("uid", uid), ("role", role), ("node", node)):
        if value:
            args.append(value)
            where.append(f"{col} = ${len(args)}")
    return await c.fetch(f"SELECT {columns} FROM fsessions WHERE {' AND '.join(where)} ORDER BY role, created"
                         + (" FOR UPDATE" if lock else ""), *args)


async def session(c: Any, uid: str, role: str, created: float) -> Any:
    return await c.fetchrow(f"SELECT * FROM fsessions WHERE {_KEY}", uid, role, created)


async def sessions(c: Any, uid: str, owner: str | None, ended: int | None) -> list[Any]:
    """The live sessions (of ``uid``, of ``owner``; '' and None: all) by creation, then the
    ``ended`` most recently ended ones (none when None)."""
    match = "($1 = '' OR uid = $1) AND ($2::text IS NULL OR owner_id = $2)"
    rows = list(await c.fetch(f"SELECT * FROM fsessions WHERE state IN {LIVE} AND {match} ORDER BY created",
                              uid, owner))
    if ended is not None:
        rows += await c.fetch(f"SELECT * FROM fsessions WHERE state NOT IN {LIVE} AND {match} "
                              "ORDER BY ended DESC LIMIT $3", uid, owner, ended)
    return rows


async def _change(c: Any, row: Any, assignments: str, *values: Any, also: str = "") -> Any:
    """``UPDATE`` one session row (``$1``-``$3`` are its key, ``$4``... ``values``, ``also`` a
    further condition): the new row, notified, or None when no row matched."""
    new = await c.fetchrow(f"UPDATE fsessions SET {assignments} WHERE {_KEY}{also} RETURNING *",
                           row["uid"], row["role"], row["created"], *values)
    if new is not None:
        await notify(c, row["uid"], row["role"])
    return new


async def set_ready(c: Any, row: Any, prod_listeners: list[str], ready_at: float, update_due: float) -> Any:
    """The hello: ``requested`` -> ``ready`` (None if the row is not waiting any more)."""
    return await _change(c, row, "state = 'ready', prod_listeners = $4, ready_at = $5, update_due = $6",
                         prod_listeners, ready_at, update_due, also=" AND state = 'requested'")


async def set_connected(c: Any, row: Any, targets: list[str], wan_secret: bytes | None, wan_security: str,
                        rate_enforced: bool, now: float, udp: str) -> Any:
    """The update the node carried out: ``connected``, its targets, WAN security and UDP carriage."""
    return await _change(
        c, row, "state = 'connected', targets = $4, wan_secret = $5, wan_security = $6, rate_enforced = $7, "
        "connected_at = CASE WHEN connected_at = 0 THEN $8 ELSE connected_at END, update_due = 0, udp = $9",
        targets, wan_secret, wan_security, rate_enforced, now, udp)


async def end(c: Any, row: Any, state: str, reason: str, ended: float, stats_json: str | None) -> Any:
    """Move a live row to a terminal state, only if it is still in ``row['state']`` (exactly
    once across instances); its ports and bandwidth are free from this commit on, its WAN
    secret erased. The new row, or None."""
    return await _change(c, row, "state = $4, last_error = $5, ended = $6, wan_secret = NULL, "
                         "stats = coalesce($7::jsonb, stats)", state, reason, ended, stats_json, row["state"],
                         also=" AND state = $8")


async def due(c: Any, now: float, limit: int = 200) -> list[Any]:
    """Live rows whose hello, update or lease time has come, locked; those another instance
    is acting on are skipped (``SKIP LOCKED``)."""
    return await c.fetch(
        f"SELECT * FROM fsessions WHERE state IN {LIVE} AND ("
        "(state = 'requested' AND hello_due > 0 AND hello_due <= $1) OR "
        "(state = 'ready' AND update_due > 0 AND update_due <= $1) OR "
        "(lease_expires > 0 AND lease_expires <= $1)) "
        "ORDER BY created LIMIT $2 FOR UPDATE SKIP LOCKED", now, limit)


async def next_due(c: Any) -> float | None:
    """The earliest hello, update or lease time of the live rows (None: no timer runs)."""
    return await c.fetchval(
        "SELECT min(least(CASE WHEN state = 'requested' AND hello_due > 0 THEN hello_due END, "
        "CASE WHEN state = 'ready' AND update_due > 0 THEN update_due END, "
        f"CASE WHEN lease_expires > 0 THEN lease_expires END)) FROM fsessions WHERE state IN {LIVE}")


# -- control instances -------------------------------------------------------------------
async def register_instance(c: Any, name: str, address: str, pid: int) -> None:
    await c.execute(
        "INSERT INTO instances (name, address, pid) VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE "
        "SET address = EXCLUDED.address, pid = EXCLUDED.pid, started = now(), heartbeat = now()",
        name, address, pid)


async def beat_instance(c: Any, name: str) -> None:
    await c.execute("UPDATE instances SET heartbeat = now() WHERE name = $1", name)


async def unregister_instance(c: Any, name: str) -> None:
    await c.execute("DELETE FROM instances WHERE name = $1", name)


async def overview(c: Any) -> tuple[list[Any], list[Any]]:
    """Every node with ``age`` (s since its heartbeat) and what its live sessions hold
    (``sessions``, ``ports_used``, ``bandwidth_used``); every instance with its ``age``."""
    of_node = f"FROM fsessions f WHERE f.node = n.name AND f.state IN {LIVE}"
    nodes = await c.fetch(
        "SELECT n.*, extract(epoch from now() - n.heartbeat) AS age, "
        f"(SELECT count(*) {of_node}) AS sessions, "
        f"(SELECT coalesce(sum(cardinality(f.ports)), 0) {of_node}) AS ports_used, "
        f"(SELECT coalesce(sum(f.bandwidth), 0) {of_node}) AS bandwidth_used FROM nodes n ORDER BY n.name")
    instances = await c.fetch("SELECT *, extract(epoch from now() - heartbeat) AS age FROM instances ORDER BY name")
    return nodes, instances

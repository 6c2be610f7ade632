"""Bad peers on the data path, every backend: a flood of connections that never complete the
WAN handshake (idle, garbage, a TLS record that never ends) is shed by the PROD WAN listener
within a bound, while a quiet established stream through the same chain is not cut; and
the per-session connection cap (``DataSpec.max_conns``) refuses what is over it and counts
the refusals.

The flood runs on every backend at once (one test, concurrent chains), so the suite waits
for the handshake bound once, not once per backend.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time

import pytest

from conftest import async_wait_until
from scistream.data import wankeys
from scistream.data.backends.common import HANDSHAKE_TIMEOUT_S
from scistream.data.base import BackendUnavailable, get_backend
from scistream.data.engine.conn import HANDSHAKE_TIMEOUT
from test_backends_support import App, Chain, Served, secret, sha, try_through

#: Bad connections per kind (idle, garbage, stalled) per chain.
FLOOD = 100
#: Every bad connection must be closed by the server this long after it was opened: the
#: handshake bound plus slack for a loaded two-core CI machine.
SHED_WITHIN = max(HANDSHAKE_TIMEOUT, HANDSHAKE_TIMEOUT_S) + 12
#: How long the good streams stay quiet: longer than any handshake bound.
QUIET_FOR = max(HANDSHAKE_TIMEOUT, HANDSHAKE_TIMEOUT_S) + 5
#: A TLS handshake record that announces 512 bytes of ClientHello and sends 16 of them.
STALLED = b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc\x03\x03" + bytes(10)
#: (label, backend, WAN secret): the TLS WAN leg on every type, and stunnel's legacy mode
#: (TLS 1.2 with the uid-derived PSK; the other types' legacy mode is plain TCP, where a
#: connection is forwarded at once and there is no handshake to bound).
CHAINS = [("Builtin", "Builtin", True), ("Haproxy", "Haproxy", True), ("Nginx", "Nginx", True), ("Stunnel", "Stunnel", True),
          ("Stunnel-legacy", "Stunnel", False)]


def _available(kind: str) -> bool:
    try:
        get_backend(kind).check_available()
    except BackendUnavailable:
        return False
    return True


@contextlib.contextmanager
def open_files(needed: int):
    """Raise the soft limit on open files to ``needed`` (if the hard limit allows) meanwhile."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.asynccontextmanager
async def node_service(tmp_path, kinds):
    """The node service the Builtin type's sessions live in, while ``kinds`` need it."""
    if "Builtin" not in kinds:
        yield None
        return
    from scistream.data.node.backend import NodeService
    node = await NodeService.open(tmp_path / "node.sock", managed=True, workers=2,
                                  log_path=tmp_path / "node.log")
    try:
        yield node
    finally:
        await node.close(keep_running=False)


async def bad_peer(port: int, kind: str, opened: list[int]) -> float:
    """Connect, misbehave, then wait for the server to close; return seconds it stayed open."""
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
    t0 = time.monotonic()
    opened.append(1)
    try:
        if kind == "garbage":
            w.write(os.urandom(200))
        elif kind == "stalled":
            w.write(STALLED)
        with contextlib.suppress(ConnectionError, OSError):
            while await r.read(4096):
                pass   # a TLS alert, then the end
        return time.monotonic() - t0
    finally:
        w.close()


async def quiet_stream(port: int, quiet_for: float, started: asyncio.Event) -> None:
    """One stream through the chain: bytes both ways, quiet for ``quiet_for`` s, bytes again."""
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 15)
    try:
        first = os.urandom(50_000)
        w.write(first)
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(len(first)), 30) == first
        started.set()
        t0 = time.monotonic()
        # the test's subject is time itself: this stream must stay quiet this long
        await asyncio.sleep(quiet_for)
        assert time.monotonic() - t0 >= quiet_for
        second = os.urandom(1 << 20)
        w.write(second)
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(len(second)), 30) == second
    finally:
        w.close()


class LateApp(Served):
    """An application endpoint that reads until the consumer's end of stream, then holds its
    answer (the SHA-256 of what it read) until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.got_all = asyncio.Event()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            data = await r.read(-1)
            self.got_all.set()
            await self.release.wait()
            w.write(sha(data))
            await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()


async def half_closed_stream(port: int, app: LateApp, quiet_for: float) -> None:
    """A stream the consumer half-closes, then waits on: the answer comes ``quiet_for`` s later."""
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 15)
    try:
        payload = os.urandom(100_000)
        w.write(payload)
        await w.drain()
        w.write_eof()
        await asyncio.wait_for(app.got_all.wait(), 30)
        await asyncio.sleep(quiet_for)   # as in quiet_stream: time is the subject
        app.release.set()
        assert await asyncio.wait_for(r.read(-1), 30) == sha(payload)
    finally:
        w.close()


async def flood_one(label: str, kind: str, tls: bool, tmp_path) -> str:
    """Run the flood on one chain; return '' or what went wrong."""
    async with App() as app, LateApp() as late, \
            Chain(kind, tmp_path / label, [app.endpoint, late.endpoint], n=2,
                  secret=secret() if tls else None) as chain:
        wan = chain.prod.spec.ports[0]
        started = asyncio.Event()
        quiet = asyncio.create_task(quiet_stream(chain.entries[0], QUIET_FOR, started))
        half = asyncio.create_task(half_closed_stream(chain.entries[1], late, QUIET_FOR))
        try:
            await asyncio.wait_for(started.wait(), 30)
            opened: list[int] = []
            tasks = [asyncio.create_task(bad_peer(wan, how, opened))
                     for how in ("idle", "garbage", "stalled") for _ in range(FLOOD)]
            done, pending = await asyncio.wait(tasks, timeout=SHED_WITHIN + 30)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            problems = []
            if pending:
                problems.append(f"{len(pending)} of {len(tasks)} bad connections still open "
                                f"after {SHED_WITHIN + 30:.0f} s")
            errors = [t.exception() for t in done if t.exception() is not None]
            if errors:
                problems.append(f"{len(errors)} bad peers failed: {errors[0]!r}")
            times = sorted(t.result() for t in done if t.exception() is None)
            if times and times[-1] > SHED_WITHIN:
                n_late = sum(1 for x in times if x > SHED_WITHIN)
                problems.append(f"{n_late} bad connections stayed open longer than {SHED_WITHIN:.0f} s "
                                f"(longest {times[-1]:.1f} s)")
            await quiet   # raises if the quiet stream was cut or its bytes differ
            await half    # the same for the half-closed one
            if app.accepted != 1:
                problems.append(f"the producer saw {app.accepted} connections, expected only the "
                                "quiet stream's")
            longest = f"{times[-1]:.1f}" if times else "-"
            print(f"{label}: {len(times)} bad connections shed, longest open {longest} s")
            return "; ".join(problems)
        finally:
            for task in (quiet, half):
                if not task.done():
                    task.cancel()
            await asyncio.gather(quiet, half, return_exceptions=True)


async def test_every_backend_sheds_handshake_floods_and_keeps_quiet_streams(tmp_path):
    """300 bad connections on a PROD WAN listener of each backend's chain, all chains at
    once: every one closed by the server within the bound, none reaches the producer. Two
    streams opened before stay quiet for longer than the bound: one then carries 1 MiB
    both ways, the other (half-closed by the consumer) gets its late answer."""
    chains = [c for c in CHAINS if _available(c[1])]
    if not chains:
        pytest.skip("no backend available")
    with open_files(len(chains) * FLOOD * 3 * 2 + 1024):
        async with node_service(tmp_path, {kind for _, kind, _ in chains}):
            results = await asyncio.gather(*(flood_one(label, kind, tls, tmp_path)
                                             for label, kind, tls in chains), return_exceptions=True)
    failed = {label: (repr(r) if isinstance(r, BaseException) else r)
              for (label, _, _), r in zip(chains, results) if r}
    assert not failed, failed


def _cap_params():
    params = []
    for name in ("Builtin", "Haproxy", "Nginx", "Stunnel"):
        cls = get_backend(name)
        why = ""
        if not cls.caps_conns:
            why = f"{name} does not cap connections per session"
        elif not _available(name):
            why = f"{name} backend unavailable"
        params.append(pytest.param(name, marks=pytest.mark.skip(reason=why)) if why else name)
    return params


async def _open_stream(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection through the chain, with bytes verified both ways; left open."""
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 15)
    block = os.urandom(10_000)
    w.write(block)
    await w.drain()
    assert await asyncio.wait_for(r.readexactly(len(block)), 15) == block
    return r, w


@pytest.mark.parametrize("kind", _cap_params())
async def test_session_connection_cap_refuses_and_counts(kind, tmp_path):
    """max_conns 4 on both gateways, 2 listeners: 4 streams (over both listeners) carry
    bytes, 3 more through the CONS listeners and 2 straight to the PROD WAN listener are
    refused, and each server counts its own refusals; closing a stream frees a place."""
    cap, key = 4, secret()
    async with node_service(tmp_path, {kind}), App() as app, \
            Chain(kind, tmp_path, [app.endpoint], n=2, secret=key, max_conns=cap) as chain:
        streams = []
        try:
            for i in range(cap):
                streams.append(await _open_stream(chain.entries[i % 2]))
            for i in range(3):
                assert await try_through(chain.entries[i % 2]) == b"", "a connection over the cap got through"
            await async_wait_until(lambda: _refused(chain.cons, 3), 15, "3 refusals counted by CONS")
            # the PROD side: a peer holding the session credentials, over the cap
            creds = wankeys.write_credentials(key, chain.uid, tmp_path / "peer")
            ctx = wankeys.ssl_context(creds, server=False)
            for i in range(2):
                with pytest.raises((ConnectionError, OSError, asyncio.IncompleteReadError)):
                    r, w = await asyncio.wait_for(asyncio.open_connection(
                        "127.0.0.1", chain.prod.spec.ports[i], ssl=ctx,
                        server_hostname="scistream-session"), 15)
                    try:
                        w.write(b"over the cap")
                        await w.drain()
                        await asyncio.wait_for(r.readexactly(12), 15)
                    finally:
                        w.close()
            await async_wait_until(lambda: _refused(chain.prod, 2), 15, "2 refusals counted by PROD")
            assert app.accepted == cap
            # one stream ends: a new connection on its listener gets its place (the
            # Builtin node service splits the cap over the workers of the listeners)
            r, w = streams.pop()   # the last one, on listener (cap - 1) % 2
            w.close()
            payload = os.urandom(100_000)
            await async_wait_until(lambda: _through(chain.entries[(cap - 1) % 2], payload), 15,
                                   "a new stream once one ended")
            assert (await chain.cons.stats()).refused_connections >= 3
        finally:
            for _, w in streams:
                w.close()


async def _refused(server, n: int) -> bool:
    return (await server.stats()).refused_connections == n


async def _through(port: int, payload: bytes) -> bool:
    return await try_through(port, payload) == payload

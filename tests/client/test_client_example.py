"""examples/connect.py (the Python API example of docs/python-api.md) runs against real
control servers, and the blocking API (scistream.client.sync) does the same job."""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import new_uid
from scistream.client import Client, Gateway, sync
from scistream.errors import DeadlineExceeded

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "connect.py"


def test_example_runs(s2cs_process):
    prod, cons = s2cs_process(insecure=False), s2cs_process(insecure=False)
    p = subprocess.run([sys.executable, str(EXAMPLE), "--prod", prod.target, "--cons", cons.target,
                        "--prod-cert", str(prod.state_dir / "server.crt"),
                        "--cons-cert", str(cons.state_dir / "server.crt"), "--num-conn", "3",
                        "--size", str(3 << 20)],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verified 3145728 bytes over 3 connections" in p.stdout
    assert "released: PROD True, CONS True" in p.stdout
    assert "PROD side is released; it carried 3145728 bytes to the consumer" in p.stdout


def _echo_once(srv: socket.socket) -> None:
    conn, _ = srv.accept()
    with conn:
        while data := conn.recv(1 << 16):
            conn.sendall(data)


def _hello(target: str, uid: str, role: str, endpoints=()) -> None:
    with Client(target, insecure=True) as c:
        for _ in range(200):  # the req may not be there yet: the server waits --hello-grace
            try:
                c.hello(uid, role, list(endpoints))
                return
            except Exception as exc:  # noqa: BLE001 - retried, then raised
                last = exc
        raise last


def test_sync_connect_release(s2cs_process):
    prod, cons = s2cs_process(), s2cs_process()
    pg, cg = Gateway(prod.target, insecure=True), Gateway(cons.target, insecure=True)
    srv = socket.create_server(("127.0.0.1", 0))
    uid = new_uid()
    threads = [threading.Thread(target=_hello, args=(prod.target, uid, "PROD",
                                                     [f"127.0.0.1:{srv.getsockname()[1]}"])),
               threading.Thread(target=_hello, args=(cons.target, uid, "CONS")),
               threading.Thread(target=_echo_once, args=(srv,))]
    for t in threads:
        t.start()
    try:
        conn = sync.connect(pg, cg, uid=uid, hello_timeout=60)
        payload = os.urandom(1 << 20)
        host, port = conn.consumer_listeners[0].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = b"".join(iter(lambda: s.recv(1 << 16), b""))
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        assert [x.state for x in sync.status(pg, uid)] == ["connected"]
        released = sync.release(conn)
        assert (released.prod, released.cons) == (True, True)
        assert [x.state for x in sync.status(cg, uid)] == ["released"]
    finally:
        for t in threads:
            t.join(30)
        srv.close()


def test_sync_errors_are_typed_and_not_usable_in_a_loop(s2cs_process):
    prod = s2cs_process()
    g = Gateway(prod.target, insecure=True)
    with pytest.raises(DeadlineExceeded, match="PROD side"):
        sync.request_prod(g, hello_timeout=0.3)
    assert [s for s in sync.status(g) if s.active] == []

    async def inside() -> None:
        sync.status(g)
    import asyncio
    with pytest.raises(RuntimeError, match="inside a running event loop"):
        asyncio.run(inside())

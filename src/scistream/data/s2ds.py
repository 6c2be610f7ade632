"""The built-in data server process: ``python -m scistream.data.s2ds CONFIG.json``.

One process serves one session on one gateway. It binds every listener first, then
opens its control socket (``control`` in the config, a Unix socket) - so a control
server that can talk to the socket knows the listeners are up. It runs in its own
process group, so the control server can be restarted (even killed) without cutting
the session's streams, and a new control server re-adopts it through the socket.

Control socket: one JSON object per line in, one per line out.
    {"op": "ping"}                         -> {"ok": true, "pid": 123}
    {"op": "stats"}                        -> {"ok": true, "bytes_in": .., "bytes_out": .., ...}
    {"op": "targets", "targets": [..]}     -> {"ok": true}   new connections go there
    {"op": "stop"}                         -> {"ok": true}   then the process exits

Config (JSON): uid, role, listen_host, ports, targets, rate_kbps, tls (bool),
cert, key (paths, when tls), control (socket path).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import ssl
import sys
import time
from pathlib import Path

log = logging.getLogger("scistream.s2ds")

CHUNK = 1 << 18


class TokenBucket:
    """Session-wide rate limit shared by every connection, in bytes per second."""

    def __init__(self, rate_kbps: int) -> None:
        self.rate = rate_kbps * 1000 / 8  # bytes/s
        self.burst = max(self.rate / 20, 64 * 1024)  # 50 ms worth, at least 64 KiB
        self.tokens = self.burst
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= n or (self.tokens >= self.burst and n > self.burst):
                self.tokens -= n
                return
            await asyncio.sleep(max((min(n, self.burst) - self.tokens) / self.rate, 0.001))


class DataServer:
    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.role = cfg["role"]
        self.targets: list[str] = list(cfg["targets"])
        self.bucket = TokenBucket(cfg["rate_kbps"]) if cfg.get("rate_kbps") else None
        self.bytes_in = 0
        self.bytes_out = 0
        self.open = 0
        self.total = 0
        self.tasks: set[asyncio.Task] = set()
        self.stopping = asyncio.Event()
        self.ssl_ctx: ssl.SSLContext | None = None
        if cfg.get("tls"):
            server_side = self.role == "PROD"
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.load_cert_chain(cfg["cert"], cfg["key"])
            ctx.load_verify_locations(cafile=cfg["cert"])
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.check_hostname = False
            self.ssl_ctx = ctx

    async def run(self) -> None:
        servers = []
        listen_ssl = self.ssl_ctx if self.role == "PROD" else None
        for i, port in enumerate(self.cfg["ports"]):
            srv = await asyncio.start_server(
                lambda r, w, i=i: self._spawn(self._handle(i, r, w)),
                self.cfg["listen_host"], port, ssl=listen_ssl, reuse_address=True,
                ssl_handshake_timeout=10 if listen_ssl else None)
            servers.append(srv)
        ctl_path = self.cfg["control"]
        try:
            os.unlink(ctl_path)
        except FileNotFoundError:
            pass
        ctl = await asyncio.start_unix_server(self._control, ctl_path)
        os.chmod(ctl_path, 0o600)
        log.info("listening on %s ports %s -> %s", self.cfg["listen_host"], self.cfg["ports"], self.targets)
        await self.stopping.wait()
        for srv in servers:
            srv.close()
        ctl.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        try:
            os.unlink(ctl_path)
        except FileNotFoundError:
            pass

    def _spawn(self, coro) -> None:
        t = asyncio.ensure_future(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def _handle(self, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = self.targets[i % len(self.targets)]
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        self.open += 1
        self.total += 1
        try:
            connect_ssl = self.ssl_ctx if self.role == "CONS" else None
            try:
                r2, w2 = await asyncio.wait_for(
                    asyncio.open_connection(host, int(port), ssl=connect_ssl,
                                            server_hostname="scistream-session" if connect_ssl else None),
                    15)
            except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
                log.warning("connection %d: cannot reach %s: %s", i, target, exc)
                return
            # Direction naming: "in" = towards the producer.
            towards_producer = "in"
            towards_consumer = "out"
            if self.role == "PROD":
                a = self._pump(reader, w2, towards_producer)
                b = self._pump(r2, writer, towards_consumer)
            else:
                a = self._pump(reader, w2, towards_producer)
                b = self._pump(r2, writer, towards_consumer)
            await asyncio.gather(a, b, return_exceptions=True)
            w2.close()
        finally:
            self.open -= 1
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        try:
            while data := await reader.read(CHUNK):
                if self.bucket is not None:
                    await self.bucket.take(len(data))
                writer.write(data)
                if direction == "in":
                    self.bytes_in += len(data)
                else:
                    self.bytes_out += len(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()
        except (OSError, ssl.SSLError, ConnectionError):
            writer.close()

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    msg = json.loads(line)
                    op = msg.get("op")
                    if op == "ping":
                        out = {"ok": True, "pid": os.getpid()}
                    elif op == "stats":
                        out = {"ok": True, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                               "connections": self.open, "total_connections": self.total}
                    elif op == "targets":
                        self.targets = [str(t) for t in msg["targets"]]
                        log.info("retargeted -> %s", self.targets)
                        out = {"ok": True}
                    elif op == "stop":
                        out = {"ok": True}
                        self.stopping.set()
                    else:
                        out = {"ok": False, "error": f"unknown op {op!r}"}
                except (ValueError, KeyError, TypeError) as exc:
                    out = {"ok": False, "error": str(exc)}
                writer.write(json.dumps(out).encode() + b"\n")
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            writer.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s s2ds[%(process)d] %(levelname)s %(message)s")
    cfg = json.loads(Path(argv[0]).read_text())
    server = DataServer(cfg)

    async def amain() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stopping.set)
        await server.run()

    try:
        asyncio.run(amain())
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

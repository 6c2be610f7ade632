"""Talking to a control server: one channel per instance, typed errors, optional token.

``AsyncClient`` wraps the four RPCs of the protocol (plus ``status``); every gRPC error
comes out as the matching ``scistream.errors`` class, with the server's message.
``Client`` is the same thing for synchronous code.

Its target is one control server ("10.0.0.2:5000") or several instances of one
facility's ("10.0.0.2:5000,10.0.0.3:5000", or a list): a call that finds an instance
unreachable goes to the next one (``scistream.client.instances`` has the rules).
``target`` is the instance the next call goes to first (the one that answered last),
``targets`` all of them, ``address`` the facility as one string, and ``last_unreachable``
the instances the last finished call found unreachable on its way.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path
from typing import Sequence

import grpc

from ..addr import parse_listener
from ..errors import CertificateRejected, LocalMistake, ScistreamError, Status, from_status
from ..proto import pb, pb_grpc
from .instances import (CONNECT_TIMEOUT, FAILOVER_WINDOW, FIRST_BACKOFF, KEEPALIVE, MAX_BACKOFF, Unreachable,
                        moves_on, parse_instances, release_is_done)

log = logging.getLogger(__name__)

DEFAULT_CERT = "server.crt"


@dataclasses.dataclass(frozen=True)
class ChannelOptions:
    server_cert: str | None = None   # PEM file to verify the server against
    insecure: bool = False           # plaintext channel (server started with --insecure)
    token: str | None = None         # sent as "authorization: Bearer <token>"
    timeout: float | None = None     # per-call deadline for quick calls (update, release)
    failover_window: float = FAILOVER_WINDOW  # several instances: how long to keep trying when unreachable
    connect_timeout: float = CONNECT_TIMEOUT  # several instances: a connection not made by then is unreachable
    keepalive: float = KEEPALIVE     # several instances: ping a quiet call this often (s); no answer -> next instance
    cert_pem: bytes | None = dataclasses.field(default=None, repr=False)  # the certificate itself,
    # used when no server_cert file is given (what the session file recorded)

    def resolved_cert(self) -> str | None:
        """The certificate file to verify against (None: ``cert_pem``, or the system's roots)."""
        if self.server_cert or self.cert_pem:
            return self.server_cert or None
        env = os.environ.get("SCISTREAM_SERVER_CERT")
        return env or (DEFAULT_CERT if Path(DEFAULT_CERT).exists() else None)


def open_channel(target: str, opts: ChannelOptions, *, connect_timeout: float | None = None) -> grpc.aio.Channel:
    """A channel to one instance; ``connect_timeout``: seconds after which a connection
    attempt that got no answer fails (gRPC's default: 20 s)."""
    parse_listener(target)
    options = [("grpc.max_receive_message_length", 1 << 20),
               ("grpc.enable_retries", 0)]
    if connect_timeout is not None:   # gRPC's minimum connect timeout is this argument
        options.append(("grpc.min_reconnect_backoff_ms", max(1, int(connect_timeout * 1000))))
        # an instance that vanished without a reset (power cut, partition) while a req waits
        # for its hello: HTTP/2 pings find it, the call fails UNAVAILABLE and moves on.
        # Only with several instances: our s2cs accepts a ping a second (control/server.py),
        # the original's server would take pings on a quiet call as abuse.
        ping_ms = max(1000, int(opts.keepalive * 1000))
        options += [("grpc.keepalive_time_ms", ping_ms), ("grpc.keepalive_timeout_ms", ping_ms),
                    ("grpc.http2.ping_timeout_ms", ping_ms), ("grpc.http2.max_pings_without_data", 0)]
    if opts.insecure:
        return grpc.aio.insecure_channel(target, options=options)
    cert = opts.resolved_cert()
    try:
        roots = Path(cert).read_bytes() if cert else opts.cert_pem
    except OSError as exc:
        raise LocalMistake(f"cannot read the server certificate {cert}: {exc.strerror}; give the "
                           "S2CS's certificate with --server-cert FILE (s2cs prints where it is), or "
                           "--insecure for a server started with --insecure; nothing was sent") from None
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)


class AsyncClient:
    def __init__(self, target: "str | Sequence[str]", opts: ChannelOptions | None = None, **kw) -> None:
        self.targets: tuple[str, ...] = parse_instances(target)
        self.address = ",".join(self.targets)
        self.opts = opts or ChannelOptions(**kw)
        bound = self.opts.connect_timeout if len(self.targets) > 1 else None
        self._channels = [open_channel(t, self.opts, connect_timeout=bound) for t in self.targets]
        self._stubs = [pb_grpc.ControlStub(ch) for ch in self._channels]
        self._current = 0
        self.last_unreachable: list[Unreachable] = []
        self.note = ""   # what the last call wants the user told (a release taken as done)

    @property
    def target(self) -> str:
        """The instance the next call goes to first: the one that answered last."""
        return self.targets[self._current]

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()

    def _metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.opts.token}")] if self.opts.token else []

    def _error(self, exc: grpc.aio.AioRpcError, target: str) -> ScistreamError:
        msg = _details(exc)
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            if (rejected := self._tls_mistake(msg, target)) is not None:
                return rejected
            if not msg.startswith("session store"):
                msg = f"cannot reach the S2CS at {target}: {msg}. Is it running there? Retry once it is"
        elif exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            msg = (f"the S2CS at {target} does not know this call ({msg}); a server of "
                   "the original SciStream tooling has no status: use our s2cs for that")
        return from_status(exc.code().name, msg)

    def _tls_mistake(self, details: str, target: str) -> ScistreamError | None:
        """The error for a connection that failed on TLS (not a server that is down):
        a certificate that does not verify, or TLS against a plaintext server."""
        cert = None if self.opts.insecure else self.opts.resolved_cert()
        given = (f"the certificate {cert}" if cert else
                 "the certificate recorded for it in this client's session file" if self.opts.cert_pem else
                 "the system's trusted roots (no --server-cert given)")
        low = details.lower()
        if "certificate_verify_failed" in low or "certificate verify failed" in low:
            why = details.rpartition("CERTIFICATE_VERIFY_FAILED")[2].strip(": ") or "verification failed"
            return CertificateRejected(
                f"the S2CS at {target} presented a TLS certificate that {given} does not verify ({why}); "
                "give that server's certificate with --server-cert FILE (s2cs prints where it is: "
                "by default STATE_DIR/server.crt)")
        if self.opts.insecure and "socket closed" in low and "failed to connect" in low:
            return CertificateRejected(
                f"the S2CS at {target} closed a plaintext connection (--insecure): it speaks TLS; "
                "drop --insecure and give its certificate with --server-cert FILE")
        if "handshake" in low and ("wrong_version_number" in low or "packet_length_too_long" in low
                                   or "http_request" in low):
            return CertificateRejected(
                f"the S2CS at {target} does not speak TLS: it was started with --insecure; "
                "pass --insecure too (development only)")
        return None

    async def _call(self, name: str, request, timeout: float | None):
        self.note = ""
        if len(self._stubs) == 1:
            self.last_unreachable = []
            try:
                return await getattr(self._stubs[0], name)(request, metadata=self._metadata(),
                                                           timeout=timeout, wait_for_ready=False)
            except grpc.aio.AioRpcError as exc:
                raise self._error(exc, self.targets[0]) from None
        return await self._failover(name, request, timeout)

    async def _failover(self, name: str, request, timeout: float | None):
        """The call on the current instance; on UNAVAILABLE on the next, round-robin, until
        the call's deadline, and at most ``failover_window`` seconds after the first
        unreachable attempt."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        give_up, delay = deadline, FIRST_BACKOFF
        failed: list[Unreachable] = []
        i, tries, n = self._current, 0, len(self._stubs)
        try:
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                try:
                    resp = await getattr(self._stubs[i], name)(
                        request, metadata=self._metadata(), timeout=remaining, wait_for_ready=False)
                except grpc.aio.AioRpcError as exc:
                    if not moves_on(exc.code()):
                        self._current = i  # it answered: the next call goes there first
                        if name == "release" and release_is_done(exc.code(), failed):
                            self.note = _released_note(request.uid, failed, self.targets[i])
                            log.warning("%s", self.note)
                            return pb.Response()
                        raise self._error(exc, self.targets[i]) from None
                    failed.append(Unreachable(self.targets[i], _details(exc)))
                    if len(failed) == 1:
                        window_end = loop.time() + self.opts.failover_window
                        give_up = window_end if give_up is None else min(give_up, window_end)
                    i, tries = (i + 1) % n, tries + 1
                    left = give_up - loop.time()
                    log.info("%s: the S2CS instance %s is unreachable (%s); %s", name, failed[-1].address,
                             failed[-1].details, f"trying {self.targets[i]}" if left > 0 else "giving up")
                    if left <= 0:
                        raise self._unreachable(failed) from None
                    if tries % n == 0:  # a whole round unreachable: a short pause, then again
                        await asyncio.sleep(min(delay, left))
                        delay = min(delay * 2, MAX_BACKOFF)
                        if loop.time() >= give_up:
                            raise self._unreachable(failed) from None
                    continue
                self._current = i
                if failed:
                    log.info("%s answered by %s after %d unreachable attempt(s)", name, self.targets[i],
                             len(failed))
                return resp
        finally:
            self.last_unreachable = failed

    def _unreachable(self, failed: list[Unreachable]) -> ScistreamError:
        last = {a.address: a.details for a in failed}
        tls = [self._tls_mistake(d, addr) for addr, d in last.items()]
        if tls and all(t is not None for t in tls):
            return tls[0]  # type: ignore[return-value]
        where = "; ".join(f"{addr}: {details}" for addr, details in last.items())
        hint = ("" if all(a.may_have_arrived for a in failed) else
                ". Is one running, and does --server-cert (or --insecure) match how they were started?")
        return from_status(Status.UNAVAILABLE,
                           f"cannot reach any instance of the S2CS at {self.address} ({where}){hint}")

    async def req(self, uid: str, role: str, num_conn: int = 5, rate: int = 0, *,
                  lease: int = 0, timeout: float | None = None) -> pb.Response:
        return await self._call("req", pb.Request(uid=uid, role=role, num_conn=num_conn,
                                                  rate=rate, lease=lease), timeout)

    async def hello(self, uid: str, role: str, prod_listeners: Sequence[str] = (), *,
                    timeout: float | None = 60) -> pb.AppResponse:
        return await self._call("hello", pb.Hello(uid=uid, role=role,
                                                  prod_listeners=list(prod_listeners)), timeout)

    async def update(self, uid: str, role: str, remote_listeners: Sequence[str],
                     wan_secret: bytes = b"", *, timeout: float | None = 60) -> pb.Response:
        return await self._call("update", pb.UpdateTargets(
            uid=uid, role=role, remote_listeners=list(remote_listeners), wan_secret=wan_secret), timeout)

    async def release(self, uid: str, *, timeout: float | None = 60) -> pb.Response:
        return await self._call("release", pb.Release(uid=uid), timeout)

    async def status(self, uid: str = "", *, timeout: float | None = 30) -> pb.StatusResponse:
        return await self._call("status", pb.StatusRequest(uid=uid), timeout)


def _details(exc: grpc.aio.AioRpcError) -> str:
    """gRPC's message, without the ": OK" some versions leave at its end."""
    return (exc.details() or exc.code().name).strip().removesuffix(": OK").removesuffix(": OK.")


def _released_note(uid: str, failed: list[Unreachable], target: str) -> str:
    first = next(a for a in failed if a.may_have_arrived)
    return (f"release {uid}: the attempt on {first.address} failed mid-call ({first.details}) and "
            f"{target} does not know the session: taken as released (the first attempt may have "
            "released it)")


class Client:
    """Synchronous wrapper: each call runs the async one on a private event loop."""

    def __init__(self, target: "str | Sequence[str]", opts: ChannelOptions | None = None, **kw) -> None:
        self._loop = asyncio.new_event_loop()
        self._async = self._loop.run_until_complete(self._make(target, opts, kw))

    @staticmethod
    async def _make(target, opts, kw) -> AsyncClient:
        return AsyncClient(target, opts, **kw)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._async.close())
            self._loop.close()

    def __getattr__(self, name: str):
        method = getattr(self._async, name)
        if not asyncio.iscoroutinefunction(method):
            return method

        def call(*args, **kwargs):
            return self._loop.run_until_complete(method(*args, **kwargs))
        return call


__all__ = ["AsyncClient", "Client", "ChannelOptions", "ScistreamError"]

"""Hostile input over the real gRPC server, property-based (hypothesis).

Thousands of arbitrary and hostile calls go to every RPC over the wire - arbitrary bytes
as the message, huge repeated fields and strings, non-UTF-8 metadata (sent as raw HTTP/2
with ``h2``, since grpc's own client refuses to), unknown roles, odd listeners - then
floods of req for one uid and races of release against release, update and status. Every
answer must be a proper status code: never UNKNOWN, and INTERNAL counts as a bug. The
server must stay up, and afterwards its port and bandwidth pools must be whole.

The control server runs on an event loop in a thread of its own, so hypothesis drives it
from plain synchronous code; the number of examples and the time are bounded.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import socket
import threading
import time
import uuid

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import port_block
from scistream.control.server import MAX_MESSAGE, ControlServer, ServerConfig
from scistream.proto import pb, pb_grpc

UNKNOWN, INTERNAL = grpc.StatusCode.UNKNOWN.value[0], grpc.StatusCode.INTERNAL.value[0]
OK = grpc.StatusCode.OK.value[0]
METHODS = ["req", "hello", "update", "release", "status"]
SETTINGS = dict(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])


class ThreadedServer:
    """A ControlServer on its own event loop in a thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-s2cs", daemon=True)
        self.thread.start()

        async def start() -> ControlServer:
            srv = ControlServer(config)
            await srv.start()
            return srv
        self.srv = self.call(start())
        self.port = self.srv.port
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def pools(self) -> tuple[int, int, int]:
        async def read() -> tuple[int, int, int]:
            r = self.srv.registry
            return len(r.active), len(r.ports.used), r.bandwidth.used
        return self.call(read())

    def wait_requested(self, uid: str, req, timeout: float = 10) -> None:
        """Until the req for uid is in (a hello waits only --hello-grace for it)."""
        async def has() -> bool:
            return any(u == uid for u, _ in self.srv.registry.active)
        deadline = time.monotonic() + timeout
        while not self.call(has()):
            if req.done():
                req.result()  # raises what the req got
            if time.monotonic() > deadline:
                raise AssertionError(f"req {uid} never arrived")
            time.sleep(0.005)

    def wait_whole(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while (left := self.pools()) != (0, 0, 0):
            if time.monotonic() > deadline:
                raise AssertionError(f"pools not whole: {left} (active sessions, ports, kbit/s)")
            time.sleep(0.02)

    def stop(self) -> None:
        try:
            self.call(self.srv.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def live(tmp_path):
    from scistream.auth.static import add_token
    tokens = tmp_path / "tokens"
    token = add_token(tokens, "fuzzer")
    other = add_token(tokens, "intruder")
    server = ThreadedServer(ServerConfig(
        port=0, auth="static", auth_options={"token_file": tokens}, insecure=True,
        port_range=port_block(40), state_dir=tmp_path / "state", hello_timeout=5,
        hello_grace=0.05, max_conn=8, max_rate=10_000_000, max_lease=3600))
    server.token, server.other = token, other
    yield server
    server.stop()


# -- raw HTTP/2: what grpc's client will not send ----------------------------------------
def raw_call(port: int, method: bytes, body: bytes, headers: list[tuple[bytes, bytes]],
             timeout: float = 10.0) -> tuple[int | None, bytes]:
    """One gRPC call as raw HTTP/2; return (grpc-status, grpc-message)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout)
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False,
            validate_inbound_headers=False))
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 24})
        conn.increment_flow_control_window(1 << 24)
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", method),
                                (b":authority", b"127.0.0.1"), (b"content-type", b"application/grpc"),
                                (b"te", b"trailers")] + headers)
        frame = b"\x00" + len(body).to_bytes(4, "big") + body
        sock.sendall(conn.data_to_send())
        view = memoryview(frame)
        status: int | None = None
        message = b""
        while True:
            while view and conn.local_flow_control_window(sid) > 0:
                n = min(len(view), conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                conn.send_data(sid, view[:n].tobytes(), end_stream=n == len(view))
                view = view[n:]
            sock.sendall(conn.data_to_send())
            data = sock.recv(1 << 16)
            if not data:
                return status, message
            for ev in conn.receive_data(data):
                if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    for k, v in ev.headers:
                        if k == b"grpc-status":
                            status = int(v)
                        elif k == b"grpc-message":
                            message = v
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)) and ev.stream_id == sid:
                    return status, message
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()

# -- strategies ---------------------------------------------------------------------------
hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=200, max_size=3000),
    st.sampled_from(["", " ", "\x00", "\u202e\u0000", "PROD\x00", "../../etc/passwd", "%s%n",
                     "A" * 70_000, "é" * 5000]),
)
uids = st.one_of(st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()), hostile_text)
roles = st.one_of(st.sampled_from(["PROD", "CONS", "", "prod", "cons", "BOTH", "PROD ", "\x00"]),
                  hostile_text)
ints = st.one_of(st.integers(-(2 ** 31), 2 ** 31 - 1), st.integers(-2, 10),
                 st.sampled_from([0, 1, 8, 9, 64, 2 ** 31 - 1, -(2 ** 31)]))
listener = st.one_of(
    st.builds(lambda p: f"127.0.0.1:{p}", st.integers(-5, 70_000)),
    st.builds(lambda p: f"[::1]:{p}", st.integers(0, 70_000)),
    st.sampled_from(["127.0.0.1", ":80", "[::1]", "[zz]:1", "::1:80", "host:", "h:1:2", "0.0.0.0:0",
                     "a" * 300 + ":1", "localhost:80", "[::ffff:127.0.0.1]:9", "-bad-:1", "ex ample:1",
                     "127.0.0.1:+80", "127.0.0.1:٣", "１２７.0.0.1:80"]),
    hostile_text)
listeners = st.one_of(st.lists(listener, max_size=6), st.lists(listener, min_size=4000, max_size=5000),
                      st.builds(lambda n: ["127.0.0.1:9"] * n, st.integers(4000, 5000)))
secrets = st.one_of(st.just(b""), st.binary(min_size=32, max_size=32), st.binary(max_size=100))


def messages():
    return st.one_of(
        st.builds(lambda *a: ("req", pb.Request(uid=a[0], role=a[1], num_conn=a[2], rate=a[3], lease=a[4])),
                  uids, roles, ints, ints, ints),
        st.builds(lambda u, r, l: ("hello", pb.Hello(uid=u, role=r, prod_listeners=l)), uids, roles, listeners),
        st.builds(lambda u, r, l, s: ("update", pb.UpdateTargets(uid=u, role=r, remote_listeners=l, wan_secret=s)),
                  uids, roles, listeners, secrets),
        st.builds(lambda u: ("release", pb.Release(uid=u)), uids),
        st.builds(lambda u: ("status", pb.StatusRequest(uid=u)), st.one_of(st.just(""), uids)),
    )


def auth_headers(token: str, other: str):
    header_value = st.binary(max_size=300).filter(lambda b: b"\r" not in b and b"\n" not in b)
    return st.one_of(
        st.just([(b"authorization", f"Bearer {token}".encode())]),
        st.just([(b"authorization", token.encode())]),
        st.just([(b"authorization", f"bearer {other}".encode())]),
        st.just([(b"authorization", b"INVALID_TOKEN")]),
        st.just([]),
        st.builds(lambda v: [(b"authorization", v)], header_value),            # non-UTF-8 values
        st.builds(lambda v: [(b"authorization", b"Bearer " + v)], header_value),
        st.builds(lambda v: [(b"authorization", f"Bearer {token}".encode()), (b"x-junk", v)], header_value),
        # -bin values travel base64-encoded (grpc core itself refuses others, with INTERNAL)
        st.builds(lambda v: [(b"authorization-bin", base64.b64encode(v)), (b"x-trace-bin", base64.b64encode(v))],
                  st.binary(max_size=100)),
        st.just([(b"authorization", f"Bearer {token}".encode())] * 2 + [(b"authorization", b"x")]),
    )


def check(status: int | None, message: bytes, what: str) -> None:
    assert status is not None, f"{what}: no grpc-status at all (server broke the stream)"
    assert status != UNKNOWN, f"{what}: UNKNOWN: {message[:300]!r}"
    assert status != INTERNAL, f"{what}: INTERNAL (a bug): {message[:300]!r}"


# -- 1: arbitrary calls, one at a time ---------------------------------------------------
def test_every_rpc_answers_hostile_input_with_a_proper_status(live):
    codes: dict[int, int] = {}

    @settings(max_examples=2500, **SETTINGS)
    @given(call=st.one_of(messages().map(lambda m: (m[0], m[1].SerializeToString())),
                          st.tuples(st.sampled_from(METHODS + ["nosuch"]), st.binary(max_size=2000))),
           headers=auth_headers(live.token, live.other),
           deadline_ms=st.one_of(st.none(), st.integers(1, 300)))
    def run(call, headers, deadline_ms):
        method, body = call
        extra = list(headers)
        if method == "req" or deadline_ms is not None:  # a req waits for its hello: bound it
            extra.append((b"grpc-timeout", f"{deadline_ms or 150}m".encode()))
        status, message = raw_call(live.port, f"/scistream.Control/{method}".encode(), body, extra)
        check(status, message, f"{method} {body[:80]!r} {headers!r:.200}")
        codes[status] = codes.get(status, 0) + 1

    run()
    # the answers were not all the same refusal: the calls reached every layer
    assert len(codes) >= 5, codes
    live.wait_whole()
    assert still_serves(live)


# -- 2: floods and races -----------------------------------------------------------------
def stub_for(live) -> tuple[grpc.Channel, pb_grpc.ControlStub]:
    ch = grpc.insecure_channel(live.target, options=[("grpc.max_send_message_length", 4 << 20)])
    return ch, pb_grpc.ControlStub(ch)


def outcome(fut) -> int:
    try:
        fut.result()
        return OK
    except grpc.RpcError as exc:
        return exc.code().value[0]


def still_serves(live) -> bool:
    ch, stub = stub_for(live)
    md = [("authorization", f"Bearer {live.token}")]
    with ch:
        uid = str(uuid.uuid4())
        req = stub.req.future(pb.Request(uid=uid, role="PROD", num_conn=2, rate=100), metadata=md, timeout=10)
        live.wait_requested(uid, req)
        stub.hello(pb.Hello(uid=uid, role="PROD", prod_listeners=["127.0.0.1:9"]), metadata=md, timeout=10)
        resp = req.result()
        stub.release(pb.Release(uid=uid), metadata=md, timeout=10)
    live.wait_whole()
    return len(resp.listeners) == 2


def wait_for(cond, timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_req_floods_and_release_races(live):
    ch, stub = stub_for(live)
    md = [("authorization", f"Bearer {live.token}")]
    pool = concurrent.futures.ThreadPoolExecutor(8)

    @settings(max_examples=60, **SETTINGS)
    @given(flood=st.integers(2, 25), releases=st.integers(2, 12), role=st.sampled_from(["PROD", "CONS"]),
           connect=st.booleans(), extra=st.lists(st.sampled_from(["status", "update", "hello", "intruder"]),
                                                 max_size=6), num_conn=st.integers(1, 8))
    def run(flood, releases, role, connect, extra, num_conn):
        uid = str(uuid.uuid4())
        request = pb.Request(uid=uid, role=role, num_conn=num_conn, rate=1000)
        reqs = [stub.req.future(request, metadata=md, timeout=15) for _ in range(flood)]
        wait_for(lambda: sum(f.done() for f in reqs) >= flood - 1, what="duplicate reqs refused")
        hello = stub.hello(pb.Hello(uid=uid, role=role, prod_listeners=["127.0.0.1:9"]), metadata=md, timeout=10)
        assert hello.listeners
        codes = sorted(outcome(f) for f in reqs)
        assert codes == [OK] + [grpc.StatusCode.ALREADY_EXISTS.value[0]] * (flood - 1), codes
        resp = next(f.result() for f in reqs if outcome(f) == OK)
        if connect:
            target = ["127.0.0.1:9"] if role == "PROD" else list(resp.listeners)
            secret = resp.wan_secret if role == "PROD" else bytes(32)
            stub.update(pb.UpdateTargets(uid=uid, role=role, remote_listeners=target, wan_secret=secret),
                        metadata=md, timeout=30)
        calls = [stub.release.future(pb.Release(uid=uid), metadata=md, timeout=30) for _ in range(releases)]
        for e in extra:
            if e == "status":
                calls.append(stub.status.future(pb.StatusRequest(uid=uid), metadata=md, timeout=30))
            elif e == "update":
                calls.append(stub.update.future(pb.UpdateTargets(uid=uid, role=role, remote_listeners=["127.0.0.1:9"],
                                                                 wan_secret=resp.wan_secret), metadata=md, timeout=30))
            elif e == "hello":
                calls.append(stub.hello.future(pb.Hello(uid=uid, role=role, prod_listeners=["127.0.0.1:9"]),
                                               metadata=md, timeout=30))
            else:
                calls.append(stub.release.future(pb.Release(uid=uid), timeout=30,
                                                 metadata=[("authorization", f"Bearer {live.other}")]))
        results = [outcome(f) for f in calls]
        for code in results:
            assert code not in (UNKNOWN, INTERNAL), results
        assert results[:releases].count(OK) == 1, results  # exactly one release wins
        live.wait_whole()

    try:
        run()
    finally:
        pool.shutdown()
        ch.close()
    assert still_serves(live)


# -- 3: message size limits ----------------------------------------------------------------
def test_message_size_limits(live):
    auth = [(b"authorization", f"Bearer {live.token}".encode())]
    big = pb.Hello(uid=str(uuid.uuid4()), role="PROD", prod_listeners=["127.0.0.1:9"] * 200_000)
    assert big.ByteSize() > MAX_MESSAGE
    status, message = raw_call(live.port, b"/scistream.Control/hello", big.SerializeToString(), auth)
    assert status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], (status, message)
    just_under = pb.Release(uid="x" * (MAX_MESSAGE - 64))
    assert just_under.ByteSize() < MAX_MESSAGE
    status, message = raw_call(live.port, b"/scistream.Control/release", just_under.SerializeToString(), auth)
    assert status == grpc.StatusCode.INVALID_ARGUMENT.value[0] and b"not a UUID" in message
    assert still_serves(live)


def test_status_answer_stays_under_the_limit(live, monkeypatch):
    from scistream.control import servicer
    monkeypatch.setattr(servicer, "STATUS_BUDGET", 1500)
    ch, stub = stub_for(live)
    md = [("authorization", f"Bearer {live.token}")]
    with ch:
        held = []
        for i in range(12):
            uid = str(uuid.uuid4())
            req = stub.req.future(pb.Request(uid=uid, role="PROD", num_conn=1, rate=100), metadata=md, timeout=10)
            live.wait_requested(uid, req)
            stub.hello(pb.Hello(uid=uid, role="PROD", prod_listeners=["127.0.0.1:9"]), metadata=md, timeout=10)
            req.result()
            if i < 2:
                held.append(uid)
            else:
                stub.release(pb.Release(uid=uid), metadata=md, timeout=10)
        resp = stub.status(pb.StatusRequest(), metadata=md, timeout=10)
        assert resp.omitted > 0 and len(resp.sessions) + resp.omitted == 12
        assert {s.uid for s in resp.sessions[:2]} == set(held)  # live sessions come first
        for uid in held:
            stub.release(pb.Release(uid=uid), metadata=md, timeout=10)
    live.wait_whole()


def test_a_burst_of_calls_is_answered_not_cancelled(live):
    """3000 calls at once on one connection: grpc core would cancel what waits past 1000."""
    ch, stub = stub_for(live)
    md = [("authorization", f"Bearer {live.token}")]
    with ch:
        uid = str(uuid.uuid4())
        calls = [stub.status.future(pb.StatusRequest(uid=uid), metadata=md, timeout=120) for _ in range(3000)]
        codes = [outcome(f) for f in calls]
    assert set(codes) == {grpc.StatusCode.NOT_FOUND.value[0]}, {c: codes.count(c) for c in set(codes)}
